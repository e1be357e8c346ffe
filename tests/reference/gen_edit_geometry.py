"""Edits of photos that are not at the diptych size: the resize and the geometry end to end.

  .venv-ref/bin/python tests/reference/gen_edit_geometry.py    (after gen_edit_adapters.py)

For each source (landscape, portrait, odd sizes) the reference does what `icedit edit` promises
(README, SPEC section 4 "do better"): half width W = 64 here, height = the source's aspect
ratio at that width rounded to the nearest multiple of 16 (at least 16), PIL's default
`Image.resize` (bicubic) to W x H, the source on both halves of a 2W x H diptych, right half
masked; then diffusers' FluxFillPipeline with the tiny pipeline and the fixture MoE-LoRA
(through gen_edit_adapters' reference), and the right half resized back to the source size
with PIL's bicubic for --keep-size.
Writes tests/fixtures/edit/geometry/<name>/{source.png, edit.png, edit_keep.png} + cases.json.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import gen_edit_adapters as ref

OUT = ref.OUT / "geometry"
WIDTH = 64
STEPS = 2
SEED = 5
SOURCES = [  # name, width, height
    ("landscape_odd", 100, 70),  # 44.8 -> 48
    ("portrait", 45, 80),  # 113.8 -> 112
    ("wide_tiny", 90, 10),  # 7.1 -> 16 (at least one row of tokens)
]


def half_size(w, h):
    exact = h * WIDTH / w
    return WIDTH, max(1, int(np.floor(exact / 16 + 0.5))) * 16


def source(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 60 * np.sin(x / 3.0)], -1)
    img[(x // 6 + y // 6) % 2 == 0] *= 0.6
    img += rng.normal(0, 10, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    moe_sd = load_file(ref.ADAPTERS / "moe_lora.safetensors")
    cases = []
    for i, (name, w, h) in enumerate(SOURCES):
        folder = OUT / name
        folder.mkdir(exist_ok=True)
        src = source(w, h, i)
        src.save(folder / "source.png")
        hw, hh = half_size(w, h)
        half = src.resize((hw, hh))  # PIL's default filter (bicubic), as ICEdit's script
        dip, mask = ref.diptych(half)
        pipe = ref.fresh_pipe()
        ref.install_moe(pipe, moe_sd, 1)
        out = pipe(prompt=ref.PROMPT, image=dip, mask_image=mask, height=hh, width=2 * hw,
                   num_inference_steps=STEPS, guidance_scale=ref.GUIDANCE,
                   max_sequence_length=ref.MAX_SEQ,
                   generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
        edit = out.crop((hw, 0, 2 * hw, hh))
        edit.save(folder / "edit.png")
        edit.resize((w, h)).save(folder / "edit_keep.png")
        cases.append(dict(name=name, source=[w, h], half=[hw, hh], steps=STEPS, seed=SEED,
                          width=WIDTH, adapter="adapters/moe_lora.safetensors", top_k=1))
        print(name, (w, h), "->", (hw, hh))
    (OUT / "cases.json").write_text(json.dumps(dict(prompt=ref.PROMPT, cases=cases), indent=1))


if __name__ == "__main__":
    main()
