"""Fixtures for the torch-compatible RNG tests (crates/icedit-pipeline/tests/torch_rng.rs).

Writes tests/fixtures/torch_randn/:
  randn.safetensors   torch.randn outputs drawn from torch.Generator("cpu").manual_seed(seed)
  cases.json          one entry per case: seed and the ordered draws (tensor key, shape, dtype)
                      made from one fresh generator, plus the torch version and CPU capability;
                      and, for a few latent-sized draws too big to store, a checksum of the bits

Every case starts from a fresh generator; a case with several draws makes them in order from
that one generator (as diffusers draws the latents, then the VAE posterior sample).

Run (from the repo root, in the reference venv, see README):
  .venv-ref/bin/python tests/reference/gen_torch_randn.py
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "torch_randn"

SEEDS = [0, 42, 2**32 + 7, 123456789012345]
# numel 1, 7, 15 (scalar path), 16, 17, 33, 1000, 3840 (vectorised path, with and without a tail)
SHAPES = [[1], [7], [3, 5], [16], [17], [3, 11], [10, 100], [2, 16, 12, 10]]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# Several draws from one generator: (name, seed, [(shape, dtype), ...]).
SEQUENCES = [
    # latents then a VAE-posterior-sized draw
    ("latents_then_posterior_f32", 42, [([1, 16, 4, 8], "f32"), ([1, 16, 4, 4], "f32")]),
    ("latents_then_posterior_bf16", 42, [([1, 16, 4, 8], "bf16"), ([1, 16, 4, 4], "bf16")]),
    # The scalar path caches the second Box-Muller value across calls, and vectorised draws
    # in between leave that cache alone.
    ("scalar_cache_across_calls", 7, [([7], "f32"), ([3], "f32"), ([33], "f32"), ([5], "f32"), ([16], "f32")]),
    # Mixed dtypes and tails continue one stream.
    ("mixed_dtypes", 123, [([20], "f32"), ([7], "bf16"), ([40], "f16"), ([17], "bf16"), ([1], "f16"), ([50], "f32")]),
]

# Latent-sized single draws, checked through a checksum: (seed, shape, dtype).
# [1, 16, 128, 128] is FLUX's latent grid at 1024x1024; [3, 1000, 333] has a tail of 8.
CHECKSUMS = [
    (0, [1, 16, 128, 128], "f32"),
    (42, [1, 16, 128, 128], "bf16"),
    (42, [3, 1000, 333], "f32"),
    (2**32 + 7, [3, 1000, 333], "f16"),
]


def bits_checksum(t):
    """sum_i bits_i * (2 i + 1) mod 2**64 over the raw bits (u32 for f32, u16 otherwise)."""
    bits = t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)
    mask = 0xFFFFFFFF if t.dtype == torch.float32 else 0xFFFF
    b = bits.flatten().numpy().astype(np.int64) & mask
    w = np.arange(b.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return int((b.astype(np.uint64) * w).sum(dtype=np.uint64))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tensors = {}
    cases = []

    def draw(gen, shape, dtype_name, key):
        tensors[key] = torch.randn(shape, generator=gen, dtype=DTYPES[dtype_name]).contiguous()
        return {"key": key, "shape": shape, "dtype": dtype_name}

    for seed in SEEDS:
        for shape in SHAPES:
            numel = 1
            for d in shape:
                numel *= d
            for dtype_name in DTYPES:
                gen = torch.Generator("cpu").manual_seed(seed)
                key = f"seed{seed}_n{numel}_{dtype_name}"
                cases.append({"name": key, "seed": seed, "draws": [draw(gen, shape, dtype_name, key)]})

    for name, seed, draws in SEQUENCES:
        gen = torch.Generator("cpu").manual_seed(seed)
        cases.append({
            "name": name,
            "seed": seed,
            "draws": [draw(gen, shape, dt, f"{name}.{i}") for i, (shape, dt) in enumerate(draws)],
        })

    checksums = []
    for seed, shape, dtype_name in CHECKSUMS:
        gen = torch.Generator("cpu").manual_seed(seed)
        t = torch.randn(shape, generator=gen, dtype=DTYPES[dtype_name])
        checksums.append({"seed": seed, "shape": shape, "dtype": dtype_name, "checksum": bits_checksum(t)})

    save_file(tensors, OUT / "randn.safetensors")
    meta = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cases": cases,
        "checksums": checksums,
    }
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (OUT / "randn.safetensors").stat().st_size
    print(f"wrote {len(tensors)} tensors ({size} bytes) and {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
