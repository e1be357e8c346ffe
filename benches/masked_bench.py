"""Masked edits whose cost follows the mask, against whole-photo edits at the same working
resolution (LazyDiffusion's comparison), on the random "medium" Fill pipeline of fill_bench.py.

For a 2048x1536 photo and masks covering 5%, 10%, 25% and 50% of it (centred 4:3 rectangles),
`icedit edit --region` edits a window around the mask at --width (512), so the window is scaled
by 512 / window width. The whole-photo edit at that same scale is `icedit edit --width
round16(2048 * scale)` without a mask: the same detail everywhere, the cost a user would pay to
get it without masked edits. Reported: the window, the transformer's image tokens per pass
(diptych tokens; plus 512 text tokens each), and each whole job's wall time (load, encode,
denoise, VAE, PNG), fresh processes, same seed.

  .venv-ref/bin/python benches/masked_bench.py                 # 2 steps, CPU f32
  .venv-ref/bin/python benches/masked_bench.py --steps 4 --fractions 0.1

The transformer's cost per step grows with tokens (linearly for the projections, quadratically
for attention); the VAE's with pixels. Both engines' timings drift by ~10% on a small machine.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
from fill_bench import prepare  # noqa: E402

WIDTH, HEIGHT = 2048, 1536
INSTRUCTION = "make it night"


def photo(path):
    import numpy as np
    from PIL import Image

    if path.exists():
        return
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 100 * np.cos(y / 23.0),
                    128 + 60 * np.sin((x + y) / 51.0)], axis=-1) + rng.normal(0, 10, (HEIGHT, WIDTH, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def region(fraction):
    """A centred 4:3 rectangle covering `fraction` of the photo."""
    w = round(math.sqrt(fraction * WIDTH * HEIGHT * 4 / 3))
    h = round(fraction * WIDTH * HEIGHT / w)
    return (WIDTH - w) // 2, (HEIGHT - h) // 2, w, h


def run(cmd, env):
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, json.loads(out.stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--fractions", default="0.05,0.1,0.25,0.5")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    model = ROOT / "target" / "bench" / "fill-medium"
    model.parent.mkdir(parents=True, exist_ok=True)
    prepare(model)
    out = ROOT / "target" / "bench" / "masked"
    out.mkdir(parents=True, exist_ok=True)
    image = out / "photo.png"
    photo(image)
    subprocess.run(["cargo", "build", "--release", "-p", "icedit-cli"], cwd=ROOT, check=True)
    icedit = ROOT / "target" / "release" / "icedit"
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    base = [str(icedit), "edit", "--model", str(model), "--image", str(image), "--instruction",
            INSTRUCTION, "--no-lora", "--steps", str(args.steps), "--seed", "42", "--dtype", "f32",
            "--quiet", "--json"]

    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        x, y, w, h = region(fraction)
        masked_s, masked = run(base + ["--width", str(args.width), "--region", f"{x},{y},{w},{h}",
                                       "--out", str(out / f"masked-{fraction}.png")], env)
        wx, wy, ww, wh = masked["masked"]["window"]
        scale = args.width / ww
        whole_width = max(16, round(WIDTH * scale / 16) * 16)
        whole_s, whole = run(base + ["--width", str(whole_width),
                                     "--out", str(out / f"whole-{fraction}.png")], env)
        row = dict(fraction=fraction, region=[x, y, w, h], window=[wx, wy, ww, wh],
                   scale=round(scale, 3), whole_width=whole_width,
                   masked_tokens=masked["transformer_image_tokens"],
                   whole_tokens=whole["transformer_image_tokens"],
                   masked_s=round(masked_s, 2), whole_s=round(whole_s, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{WIDTH}x{HEIGHT} photo, working width {args.width}, {args.steps} steps, f32 CPU, "
          f"{args.threads} threads (+512 text tokens per pass)")
    print("| mask | window | scale | tokens masked / whole | ratio | job masked / whole | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fraction']:.0%} | {r['window'][2]}x{r['window'][3]} | {r['scale']} | "
              f"{r['masked_tokens']} / {r['whole_tokens']} | "
              f"{r['whole_tokens'] / r['masked_tokens']:.1f}x | "
              f"{r['masked_s']:.1f} s / {r['whole_s']:.1f} s | {r['whole_s'] / r['masked_s']:.1f}x |")


if __name__ == "__main__":
    main()
