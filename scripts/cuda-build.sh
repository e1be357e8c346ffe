#!/usr/bin/env bash
# Compile the CUDA build on a machine without a GPU or CUDA toolkit, using the toolchain that
# scripts/cuda-toolchain.sh installs into .cuda/ (installed or verified first; cached).
#
#   scripts/cuda-build.sh check   # cargo check -p icedit-cli --features cuda,flash-attn (what CI
#                                 # runs): build scripts run under check, so this compiles every
#                                 # candle CUDA kernel with nvcc (PTX + the quantized-matmul
#                                 # library), our two flash attention kernels, and type-checks
#                                 # all cfg(feature = "cuda") Rust code.
#   scripts/cuda-build.sh build   # cargo build --release -p icedit-cli --features cuda,flash-attn:
#                                 # the same plus codegen and the link against the stub libraries.
#   scripts/cuda-build.sh build -- --other-cargo-args
#
# Output goes to target/cuda (ICEDIT_CUDA_TARGET_DIR overrides) so it does not invalidate the
# CPU build in target/. CUDA_COMPUTE_CAP defaults to 90 (H100/H200). CUDAFORGE_THREADS (nvcc
# jobs) defaults to the number of CPUs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode="${1:-check}"
shift || true
[ "${1:-}" = "--" ] && shift

"$ROOT/scripts/cuda-toolchain.sh" >/dev/null
# Flash attention's kernels compile against CUTLASS's headers (pinned wheel, cached in .cuda/).
export ICEDIT_CUTLASS_INCLUDE="${ICEDIT_CUTLASS_INCLUDE:-$("$ROOT/scripts/cutlass-headers.sh")}"
# shellcheck source=cuda-env.sh
source "$ROOT/scripts/cuda-env.sh"
export CARGO_TARGET_DIR="${ICEDIT_CUDA_TARGET_DIR:-$ROOT/target/cuda}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc 2>/dev/null || echo 2)}"
# ICEDIT_CUDA_FEATURES=cuda builds without flash attention.
FEATURES="${ICEDIT_CUDA_FEATURES:-cuda,flash-attn}"
cd "$ROOT"
echo "cuda-build: $(nvcc --version | tail -1), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR" >&2

case "$mode" in
  check) set -x; cargo check --locked -p icedit-cli --features "$FEATURES" "$@" ;;
  build) set -x; cargo build --locked --release -p icedit-cli --features "$FEATURES" "$@" ;;
  *) echo "usage: $0 [check|build] [-- cargo args]" >&2; exit 2 ;;
esac
