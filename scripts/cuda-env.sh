# Source this (bash/zsh) after scripts/cuda-toolchain.sh to build with the toolchain in .cuda/:
#   source scripts/cuda-env.sh && cargo build --release -p icedit-cli --features cuda
# CUDA_COMPUTE_CAP selects the GPU the kernels are compiled for (default 90: H100/H200;
# 89: RTX 40xx/L4/L40, 86: RTX 30xx/A10, 80: A100). No GPU is queried at build time.
_icedit_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
_icedit_cuda="${ICEDIT_CUDA_DIR:-$_icedit_root/.cuda}/pkgs/nvidia/cu13"
if [ ! -x "$_icedit_cuda/bin/nvcc" ] || [ ! -f "$_icedit_cuda/lib/stubs/libcuda.so" ]; then
  echo "cuda-env.sh: no toolchain in $_icedit_cuda; run scripts/cuda-toolchain.sh first" >&2
  unset _icedit_root _icedit_cuda
  return 1 2>/dev/null || exit 1
fi
export CUDA_HOME="$_icedit_cuda"
export CUDA_PATH="$_icedit_cuda"
export PATH="$_icedit_cuda/bin:$PATH"
# Link-time only: stubs for libcuda/libcublas/libcublasLt/libcurand/libnvrtc, and libcudart.
export LIBRARY_PATH="$_icedit_cuda/lib/stubs:$_icedit_cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
unset _icedit_root _icedit_cuda
