"""PIL resizes for the Rust resampler's parity test (crates/icedit-pipeline/src/resize.rs).

  .venv-ref/bin/python tests/reference/gen_resize.py

Writes tests/fixtures/resize/: a structured RGB source (sharp edges, gradients, noise, so that
every tap of the filters matters), its grayscale version, and PIL's results for each case in
cases.json. PNG is lossless, so the Rust test compares pixels exactly.
"""

import json
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "resize"

CASES = [
    # (name, mode, filter, width, height)
    ("bicubic_down", "RGB", "bicubic", 64, 40),
    ("bicubic_up", "RGB", "bicubic", 150, 90),
    ("bicubic_width_only", "RGB", "bicubic", 64, 61),
    ("bicubic_height_only", "RGB", "bicubic", 97, 30),
    ("bicubic_512", "RGB", "bicubic", 512, 320),
    ("bicubic_wider_shorter", "RGB", "bicubic", 140, 38),
    ("bicubic_narrower_taller", "RGB", "bicubic", 60, 90),
    ("bicubic_down_mostly_height", "RGB", "bicubic", 90, 30),
    ("bicubic_down_height_twice_width", "RGB", "bicubic", 90, 47),
    ("lanczos_wider_shorter", "RGB", "lanczos", 120, 30),
    ("lanczos_down", "RGB", "lanczos", 80, 48),
    ("lanczos_strong_down", "RGB", "lanczos", 16, 16),
    ("lanczos_gray", "L", "lanczos", 80, 48),
]


def source():
    rng = np.random.default_rng(7)
    h, w = 61, 97
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = 255 * x / (w - 1)
    img[..., 1] = 255 * (y / (h - 1)) ** 2
    img[..., 2] = 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    img[(x // 8 + y // 8) % 2 == 0] *= 0.5  # checkerboard: sharp edges
    img[20:30, 40:70] = [255, 255, 255]
    img[35:37, :] = [0, 0, 0]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    src = source()
    src.save(OUT / "source.png")
    src.convert("L").save(OUT / "source_gray.png")
    filters = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
    cases = []
    for name, mode, filt, w, h in CASES:
        img = src if mode == "RGB" else src.convert("L")
        img.resize((w, h), filters[filt]).save(OUT / f"{name}.png")
        cases.append(dict(name=name, mode=mode, filter=filt, width=w, height=h))
    # PIL's default filter for Image.resize, as ICEdit's script calls it.
    default = src.resize((64, 40))
    assert np.array_equal(np.asarray(default), np.asarray(Image.open(OUT / "bicubic_down.png")))
    (OUT / "cases.json").write_text(json.dumps(dict(pillow=PIL.__version__, cases=cases), indent=1))
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
