#!/usr/bin/env bash
# Install the CUTLASS/CuTe C++ headers that crates/icedit-flash-attn compiles against into
# .cuda/cutlass/ (git-ignored), from NVIDIA's pinned PyPI wheel; print the include path.
#
#   scripts/cutlass-headers.sh        # install (or verify the cached install), print the path
#   ICEDIT_CUTLASS_INCLUDE="$(scripts/cutlass-headers.sh)" cargo build -p icedit-flash-attn --features cuda
#
# (The crate's build.rs also finds <repo>/.cuda/cutlass/include on its own.)
#
# What it installs: the wheel nvidia-cutlass==4.2.0.0 (6.4 MB, sha256-pinned below) is
# downloaded with pip (no dependencies, nothing installed into any Python environment) and only
# its header trees, cutlass_library/source/include/{cute,cutlass}, plus its LICENSE.txt are
# unpacked, into .cuda/cutlass/{include,LICENSE.txt} (about 15 MB). Header-only: nothing is
# compiled here.
#
# Idempotent: a stamp file records the pin and hash; when it matches, nothing is downloaded.
# Needs python3 with pip and network access to PyPI on the first run. Any failure (no PyPI, a
# hash mismatch) exits non-zero: it never skips.
#
# Environment: ICEDIT_CUDA_DIR (default <repo>/.cuda), PIP_* variables are honoured by pip.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_DIR="${ICEDIT_CUDA_DIR:-$ROOT/.cuda}"
CUTLASS_DIR="$CUDA_DIR/cutlass"
INCLUDE="$CUTLASS_DIR/include"
STAMP="$CUTLASS_DIR/installed.txt"

# candle-flash-attn 0.11.1 pins CUTLASS git commit 7d49e6c7 (a 3.x tree) and clones it at build
# time; the flash-attention v2 sm80 kernels only use CuTe/CUTLASS 2.x-style APIs that 4.2.0
# still ships unchanged, and they compile against it with nvcc 13.0 (checked for sm_90a).
PIN="nvidia-cutlass==4.2.0.0"
WHEEL="nvidia_cutlass-4.2.0.0-py3-none-any.whl"
SHA256="f9599ada45c7bcb6bf53f7d3f0a7d154183e53451c01bfa59eecd37dd4a693f6"
# Bump when the unpacked layout below changes, to force a reinstall of the cached tree.
LAYOUT_VERSION=1

log() { printf 'cutlass-headers: %s\n' "$*" >&2; }
die() { printf 'cutlass-headers: error: %s\n' "$*" >&2; exit 1; }

want_stamp() {
  printf 'layout=%s\n%s\nsha256=%s\n' "$LAYOUT_VERSION" "$PIN" "$SHA256"
}

if [ -f "$STAMP" ] && [ -f "$INCLUDE/cute/tensor.hpp" ] && [ -f "$INCLUDE/cutlass/cutlass.h" ] \
  && [ "$(cat "$STAMP")" = "$(want_stamp)" ]; then
  log "cached headers in $CUTLASS_DIR are up to date"
else
  python3 -m pip --version >/dev/null 2>&1 || die "python3 with pip is needed (python3 -m pip)"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT

  log "downloading $PIN from PyPI"
  # --require-hashes: pip itself refuses a wheel whose sha256 differs from the pin.
  printf '%s --hash=sha256:%s\n' "$PIN" "$SHA256" >"$tmp/requirements.txt"
  python3 -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
    --only-binary=:all: --require-hashes -r "$tmp/requirements.txt" -d "$tmp" \
    || die "pip download from PyPI failed (network? proxy? see the pip error above)"
  [ -f "$tmp/$WHEEL" ] || die "pip did not produce $WHEEL"
  got="$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$tmp/$WHEEL")"
  [ "$got" = "$SHA256" ] || die "sha256 mismatch for $WHEEL: got $got, want $SHA256"

  rm -rf "$CUTLASS_DIR"
  mkdir -p "$CUTLASS_DIR"
  python3 - "$tmp/$WHEEL" "$tmp/unpacked" <<'PY'
import sys, zipfile, os, shutil
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "cutlass_library/source/include/"
lic = "nvidia_cutlass-4.2.0.0.dist-info/licenses/LICENSE.txt"
n = 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith("/"):
            continue
        if name.startswith(prefix + "cute/") or name.startswith(prefix + "cutlass/"):
            rel = os.path.join("include", name[len(prefix):])
        elif name == lic:
            rel = "LICENSE.txt"
        else:
            continue
        if ".." in rel.split(os.sep):
            sys.exit("refusing path " + name)
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(name) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        n += 1
if n < 100:
    sys.exit("only %d files unpacked: unexpected wheel layout" % n)
PY
  [ -f "$tmp/unpacked/include/cute/tensor.hpp" ] && [ -f "$tmp/unpacked/include/cutlass/cutlass.h" ] \
    || die "the wheel did not contain include/{cute,cutlass}"
  mv "$tmp/unpacked/include" "$INCLUDE"
  mv "$tmp/unpacked/LICENSE.txt" "$CUTLASS_DIR/LICENSE.txt"
  want_stamp >"$STAMP"
  log "installed $PIN headers ($(du -sh "$CUTLASS_DIR" | cut -f1))"
fi

printf '%s\n' "$INCLUDE"
