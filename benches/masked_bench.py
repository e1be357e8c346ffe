"""Masked edits whose cost follows the mask, against whole-photo edits at the same working
resolution (LazyDiffusion's comparison), on the random "medium" Fill pipeline of fill_bench.py.

For a 2048x1536 photo and masks covering 5%, 10%, 25% and 50% of it (centred 4:3 rectangles),
`icedit edit --region` edits a window around the mask at --width (512), so the window is scaled
by 512 / window width. The whole-photo edit at that same scale is `icedit edit --width
round16(2048 * scale)` without a mask: the same detail everywhere, the cost a user would pay to
get it without masked edits. Reported: the window, the transformer's image tokens per pass
(diptych tokens; plus 512 text tokens each), one transformer pass at each size (`icedit inspect
--forward`: the cost of every denoising step), and the masked edit's whole job (load, encode,
1 step, VAE, stitch, PNG). Whole-photo jobs at these sizes take minutes per step on a CPU, so
their per-step cost is what is timed.

  .venv-ref/bin/python benches/masked_bench.py
  .venv-ref/bin/python benches/masked_bench.py --fractions 0.1

The transformer's cost per step grows with tokens (linearly for the projections, quadratically
for attention). Timings on a small shared machine drift by ~10%.
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
            INSTRUCTION, "--no-lora", "--steps", "1", "--seed", "42", "--dtype", "f32",
            "--quiet", "--json"]

    def forward_seconds(width, height):
        out = subprocess.run([str(icedit), "inspect", "--model", str(model / "transformer"),
                              "--dtype", "f32", "--forward", f"{width}x{height}"],
                             check=True, env=env, capture_output=True, text=True).stdout
        line = next(l for l in out.splitlines() if l.startswith("forward"))
        return float(line.split(": ")[1].split("s,")[0])

    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        x, y, w, h = region(fraction)
        masked_s, masked = run(base + ["--width", str(args.width), "--region", f"{x},{y},{w},{h}",
                                       "--out", str(out / f"masked-{fraction}.png")], env)
        wx, wy, ww, wh = masked["masked"]["window"]
        dw, dh = masked["generated"]
        scale = args.width / ww
        whole_width = max(16, round(WIDTH * scale / 16) * 16)
        whole_height = max(16, round(HEIGHT * whole_width / WIDTH / 16) * 16)
        row = dict(fraction=fraction, region=[x, y, w, h], window=[wx, wy, ww, wh],
                   scale=round(scale, 3), whole_width=whole_width,
                   masked_tokens=masked["transformer_image_tokens"],
                   whole_tokens=(2 * whole_width // 16) * (whole_height // 16),
                   masked_job_s=round(masked_s, 2),
                   masked_step_s=round(forward_seconds(dw, dh), 2),
                   whole_step_s=round(forward_seconds(2 * whole_width, whole_height), 2))
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{WIDTH}x{HEIGHT} photo, working width {args.width}, f32 CPU, {args.threads} threads "
          f"(+512 text tokens per pass)")
    print("| mask | window | scale | image tokens, masked / whole photo | ratio | one step, masked / whole photo | ratio | masked job (1 step) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fraction']:.0%} | {r['window'][2]}x{r['window'][3]} | {r['scale']} | "
              f"{r['masked_tokens']} / {r['whole_tokens']} | "
              f"{r['whole_tokens'] / r['masked_tokens']:.1f}x | "
              f"{r['masked_step_s']:.1f} s / {r['whole_step_s']:.1f} s | "
              f"{r['whole_step_s'] / r['masked_step_s']:.1f}x | {r['masked_job_s']:.1f} s |")


if __name__ == "__main__":
    main()
