#!/usr/bin/env bash
# The one-command GPU check, run on a lent machine from the repo's root with the bundle
# (scripts/gpu-bundle.sh) carried:
#
#   run(command="bash benches/gpu/run.sh", carry=[".gpu"], timeout_s=540)
#
# 1. `icedit selftest --device cuda`: every parity fixture on the GPU (transformer f32, bf16,
#    f16 in both layouts, attention at head size 128 both ways, GGUF forwards, whole edits with
#    LoRA and MoE-LoRA).
# 2. FLUX.1 Fill's transformer at its real shape, random bf16 weights made by diffusers on the
#    GPU, at a 1024x512 diptych (2048 image + 512 text tokens): diffusers' seconds per forward
#    and peak memory, then icedit's on the same weights and inputs (and its difference from
#    diffusers' output) with the blocks resident (flash attention, then attention in query
#    chunks: ICEDIT_FLASH_ATTN=0) and streamed (--offload blocks), then quantized at load to
#    Q8_0 and Q4_K.
# Everything goes to $OUT. A dry run on the CPU, anywhere (a reduced model, 2 + 2 blocks):
#   GPU_CHECK_DRY=1 PYTHON=.venv-ref/bin/python bash benches/gpu/run.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-$(mktemp -d)}"
if [ -n "${GPU_CHECK_DRY:-}" ]; then
  DEVICE=cpu; SMALL=--small; TOKENS=(--width 256 --height 128 --text-tokens 64 --repeat 1)
  ICEDIT="${ICEDIT:-target/release/icedit}"
else
  DEVICE=cuda; SMALL=; TOKENS=(--repeat 5)
  ICEDIT=/tmp/icedit-gpu
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.gpu/icedit.xz'), open('$ICEDIT', 'wb'))" \
    && chmod +x "$ICEDIT" || exit 1
  # cudarc links libcuda (the driver's), libcublas, libcudart and libcurand (CUDA 13): from the
  # toolkit, the driver's folder, or the nvidia-* wheels PyTorch brings.
  WHEEL_LIBS=$(python3 -c "import sys, glob, os; print(':'.join(sorted({os.path.dirname(p) for sp in sys.path for p in glob.glob(os.path.join(sp, 'nvidia', '**', 'lib*.so*'), recursive=True)})))")
  export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:$WHEEL_LIBS:${LD_LIBRARY_PATH:-}"
  if ldd "$ICEDIT" | grep "not found"; then
    echo "icedit cannot find the CUDA libraries above; LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$OUT/summary.txt"
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
echo "== selftest" | tee "$OUT/summary.txt"
"$ICEDIT" selftest --device "$DEVICE" 2>&1 | tee "$OUT/selftest.txt" | tail -3 | tee -a "$OUT/summary.txt"

echo "== diffusers, real shape, bf16" | tee -a "$OUT/summary.txt"
WORK=/tmp/flux_real
"${PYTHON:-python3}" benches/gpu/flux_real.py --out "$WORK" --device "$DEVICE" $SMALL "${TOKENS[@]}" 2>&1 \
  | tee "$OUT/diffusers.txt" | tee -a "$OUT/summary.txt"
REPEAT=5; [ -n "${GPU_CHECK_DRY:-}" ] && REPEAT=1
# Each variant: flash attention on or off (ICEDIT_FLASH_ATTN), then inspect's flags.
for variant in "1" "0" "1 --offload-blocks" "1 --quantize q8_0" "1 --quantize q4_k" \
    "1 --quantize q4_k --offload-blocks"; do
  flash=${variant%% *}; flags=${variant#"$flash"}
  echo "== icedit bf16 ICEDIT_FLASH_ATTN=$flash$flags" | tee -a "$OUT/summary.txt"
  # shellcheck disable=SC2086
  ICEDIT_FLASH_ATTN=$flash timeout 150 "$ICEDIT" inspect --model "$WORK/transformer" --dtype bf16 \
    --device "$DEVICE" --inputs "$WORK/io.safetensors" --repeat "$REPEAT" $flags 2>&1 \
    | grep -E "loaded|attention|weights|forward|vs out|peak|rror" | tee -a "$OUT/summary.txt"
done
echo "== done; results in $OUT" | tee -a "$OUT/summary.txt"
