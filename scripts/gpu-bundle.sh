#!/usr/bin/env bash
# Pack what the one-command GPU check needs into .gpu/ (git-ignored), for a lent machine that
# has nvcc, a driver, PyTorch and transformers but no Rust toolchain and no network:
#
#   .gpu/icedit.xz                  release build with --features cuda (CUDA_COMPUTE_CAP=90,
#                                   H100/H200), stripped (about 80 MB: its kernels' PTX) and
#                                   xz-compressed (about 10 MB); run.sh unpacks it
#   .gpu/wheels/*.whl               diffusers (the device has none) and importlib_metadata
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

rm -rf .gpu && mkdir -p .gpu/wheels
cp "$ICEDIT_CUDA_TARGET_DIR/release/icedit" .gpu/icedit
strip .gpu/icedit
xz -T0 -9 -f .gpu/icedit

# Wheels for the device's Python (3.12 there): diffusers as the reference pins it and the one
# need of it the device lacks. It has torch, transformers, numpy, safetensors, pillow, zipp.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform any -d .gpu/wheels \
  diffusers==0.42.1 importlib_metadata

tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
bundle_bytes=$(du -cb .gpu | tail -1 | cut -f1)
total=$((tree_bytes + bundle_bytes))
echo "gpu-bundle: .gpu/icedit.xz $(du -h .gpu/icedit.xz | cut -f1), wheels $(du -ch .gpu/wheels/*.whl | tail -1 | cut -f1);"
echo "gpu-bundle: tracked tree $((tree_bytes >> 20)) MiB + .gpu $((bundle_bytes >> 20)) MiB = $((total >> 20)) MiB of the 64 MiB the device takes"
if [ "$total" -gt $((64 << 20)) ]; then
  echo "gpu-bundle: too large for the device tool (64 MiB)" >&2
  exit 1
fi
