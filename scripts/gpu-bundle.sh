#!/usr/bin/env bash
# Pack what the one-command GPU check needs into .gpu/ (git-ignored), for a lent machine that
# has nvcc, a driver, PyTorch and transformers but no Rust toolchain and no network:
#
#   .gpu/icedit                     release build with --features cuda (CUDA_COMPUTE_CAP=90,
#                                   H100/H200), stripped
#   .gpu/wheels/*.whl               diffusers (the device has none), gguf-py, and their pure-Python
#                                   needs the device lacks
#
# The fixtures (tests/fixtures) and the scripts (benches/gpu/) are tracked, so they travel with
# the working tree; the device tool takes at most 64 MiB in all, and this script says how much
# the tree plus .gpu/ comes to. Then, with a GPU lent:
#
#   run(command="bash benches/gpu/run.sh", carry=[".gpu"], timeout_s=540)
#
# Usage: scripts/gpu-bundle.sh            (builds, or reuses a current build)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export ICEDIT_CUDA_TARGET_DIR="${ICEDIT_CUDA_TARGET_DIR:-${HOME:-$ROOT}/.cache/icedit/target-cuda}"
scripts/cuda-build.sh build

mkdir -p .gpu/wheels
cp "$ICEDIT_CUDA_TARGET_DIR/release/icedit" .gpu/icedit
strip .gpu/icedit

# Wheels for the device's Python (3.12 there): diffusers as the reference pins it, gguf-py for
# writing the real-shape GGUF files. The device has torch, transformers, numpy, safetensors.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform any -d .gpu/wheels \
  diffusers==0.42.1 gguf==0.19.0 importlib_metadata zipp

tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
bundle_bytes=$(du -cb .gpu | tail -1 | cut -f1)
total=$((tree_bytes + bundle_bytes))
echo "gpu-bundle: .gpu/icedit $(du -h .gpu/icedit | cut -f1), wheels $(du -ch .gpu/wheels/*.whl | tail -1 | cut -f1);"
echo "gpu-bundle: tracked tree $((tree_bytes >> 20)) MiB + .gpu $((bundle_bytes >> 20)) MiB = $((total >> 20)) MiB of the 64 MiB the device takes"
if [ "$total" -gt $((64 << 20)) ]; then
  echo "gpu-bundle: too large for the device tool (64 MiB)" >&2
  exit 1
fi
