#!/usr/bin/env bash
# Install a build-only CUDA 13.0 toolchain into .cuda/ (git-ignored) so that
# `cargo build --features cuda` works on machines without a CUDA toolkit or GPU (CI, laptops).
#
#   scripts/cuda-toolchain.sh          # install (or verify the cached install), print the env
#   source scripts/cuda-env.sh         # then export CUDA_HOME, PATH, CUDA_COMPUTE_CAP, ...
#
# What it installs (about 105 MB of wheels from PyPI, about 275 MB unpacked):
#   nvcc, ptxas, fatbinary, nvlink, cicc (nvvm), the CUDA runtime headers/libcudart and CCCL,
#   from NVIDIA's official PyPI wheels, pinned below. They unpack into one CUDA_HOME-like tree,
#   .cuda/pkgs/nvidia/cu13/{bin,include,lib,nvvm}.
# What it generates:
#   lib/stubs/lib{cuda,cublas,cublasLt,curand,nvrtc}.so: link-time stubs. cudarc (through
#   candle-core's `dynamic-linking` feature) links these libraries; the stubs define every symbol
#   cudarc's bindings declare and carry the real SONAMEs (libcuda.so.1, libcublas.so.13, ...), so
#   the binary they link loads the real driver and CUDA libraries at run time. They are only
#   for linking: running the binary needs an NVIDIA driver and the CUDA 13 libraries installed.
#
# Idempotent: a stamp file records the pins and the cudarc version the stubs were generated
# from; when it matches, nothing is downloaded. Needs python3 with pip, gcc, and network access
# to PyPI on the first run. Any failure (no PyPI, no pip) exits non-zero: it never skips.
#
# Environment: ICEDIT_CUDA_DIR (default <repo>/.cuda), PIP_* variables are honoured by pip.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_DIR="${ICEDIT_CUDA_DIR:-$ROOT/.cuda}"
PKGS="$CUDA_DIR/pkgs"
CUDA_HOME_DIR="$PKGS/nvidia/cu13"
STAMP="$CUDA_DIR/installed.txt"

# The CUDA 13.0 wheels. The CUDA 12 wheels (nvidia-cuda-nvcc-cu12) ship no nvcc binary; the
# `-cu13` names on PyPI are empty 0.0.1 placeholders, so these are the un-suffixed packages.
# Newest 13.0.x of each as of this writing; installed with --no-deps (their dependencies are
# exactly these packages, unpinned).
PINS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
)
# Bump when the stub generation below changes, to force a rebuild of the cached tree.
LAYOUT_VERSION=1

log() { printf 'cuda-toolchain: %s\n' "$*" >&2; }
die() { printf 'cuda-toolchain: error: %s\n' "$*" >&2; exit 1; }

# --- cudarc's sources: the stubs must define the symbols its bindings link against -------------
cudarc_version="$(awk '/^name = "cudarc"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$ROOT/Cargo.lock")"
[ -n "$cudarc_version" ] || die "cudarc not found in Cargo.lock"

find_cudarc_src() {
  local d
  for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version"; do
    if [ -f "$d/src/driver/sys/mod.rs" ]; then
      printf '%s\n' "$d"
      return 0
    fi
  done
  return 1
}

want_stamp() {
  printf 'layout=%s\ncudarc=%s\n' "$LAYOUT_VERSION" "$cudarc_version"
  printf '%s\n' "${PINS[@]}"
}

if [ -f "$STAMP" ] && [ -x "$CUDA_HOME_DIR/bin/nvcc" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ]; then
  log "cached toolchain in $CUDA_DIR is up to date"
else
  command -v gcc >/dev/null || die "gcc is needed to build the link stubs"
  python3 -m pip --version >/dev/null 2>&1 || die "python3 with pip is needed (python3 -m pip)"

  src="$(find_cudarc_src)" || {
    log "cudarc $cudarc_version sources not in the cargo registry yet: cargo fetch --locked"
    (cd "$ROOT" && cargo fetch --locked)
    src="$(find_cudarc_src)" || die "cudarc $cudarc_version sources not found after cargo fetch"
  }

  log "installing ${PINS[*]} into $PKGS"
  rm -rf "$PKGS" "$STAMP"
  mkdir -p "$CUDA_DIR"
  # Fail loudly: CI has PyPI access, and a CUDA check that silently skips proves nothing.
  PIP_ROOT_USER_ACTION="${PIP_ROOT_USER_ACTION:-ignore}" \
    python3 -m pip install --quiet --disable-pip-version-check --no-input --no-deps --no-compile \
    --target "$PKGS" "${PINS[@]}" \
    || die "pip install from PyPI failed (network? proxy? see the pip error above)"
  [ -x "$CUDA_HOME_DIR/bin/nvcc" ] || die "the wheels did not provide $CUDA_HOME_DIR/bin/nvcc"

  # A CUDA_HOME-like tree: the wheels already unpack into bin/ include/ lib/ nvvm/ under
  # nvidia/cu13 (bin/nvcc.profile points nvcc at ../nvvm/bin/cicc). Add what the linker needs.
  lib="$CUDA_HOME_DIR/lib"
  ln -sfn libcudart.so.13 "$lib/libcudart.so"   # candle-kernels links -lcudart
  ln -sfn lib "$CUDA_HOME_DIR/lib64"

  stubs="$lib/stubs"
  mkdir -p "$stubs"
  gen_stub() { # module-in-cudarc library-name soname
    local module="$1" name="$2" soname="$3" c="$stubs/$2.c" n
    grep -o 'load::<_F>("[A-Za-z0-9_]*")' "$src/src/$module/sys/mod.rs" \
      | sed 's/.*("\(.*\)")/void \1(void) {}/' | sort -u >"$c"
    n="$(wc -l <"$c")"
    [ "$n" -gt 0 ] || die "no symbols found for $name in $src/src/$module/sys/mod.rs"
    gcc -shared -fPIC -O0 -w -Wl,-soname,"$soname" -o "$stubs/lib$name.so" "$c"
    rm -f "$c"
    log "stub lib$name.so ($soname, $n symbols)"
  }
  gen_stub driver cuda libcuda.so.1
  gen_stub cublas cublas libcublas.so.13
  gen_stub cublaslt cublasLt libcublasLt.so.13
  gen_stub curand curand libcurand.so.10
  gen_stub nvrtc nvrtc libnvrtc.so.13

  want_stamp >"$STAMP"
  log "installed: $("$CUDA_HOME_DIR/bin/nvcc" --version | tail -1) ($(du -sh "$CUDA_DIR" | cut -f1))"
fi

cat <<EOF
# CUDA build environment (or: source scripts/cuda-env.sh)
export CUDA_HOME="$CUDA_HOME_DIR"
export CUDA_PATH="$CUDA_HOME_DIR"
export PATH="$CUDA_HOME_DIR/bin:\$PATH"
export LIBRARY_PATH="$CUDA_HOME_DIR/lib/stubs:$CUDA_HOME_DIR/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
EOF
