"""Step caches and fewer steps on the random "medium" Fill pipeline of fill_bench.py: transformer
evaluations computed in full and whole-job wall time of `icedit edit` (a 512x384 photo, the
diptych at width 256, f32 CPU) with no cache, First Block Cache at two thresholds, TaylorSeer's
defaults, and 8 steps (what `--fast` runs; its turbo LoRA is not in this offline bench).

  .venv-ref/bin/python benches/cache_bench.py

The weights are random, so how many steps a cache skips says nothing about FLUX.1: the figures
show what each setting costs when it skips what it skips here. The real model's savings need a
GPU run with real weights.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
from fill_bench import prepare  # noqa: E402
from masked_bench import photo  # noqa: E402

SETTINGS = [
    ("28 steps, no cache", ["--steps", "28"]),
    ("28 steps, first-block:0.05", ["--steps", "28", "--cache", "first-block:0.05"]),
    ("28 steps, first-block:0.2", ["--steps", "28", "--cache", "first-block:0.2"]),
    ("28 steps, taylorseer", ["--steps", "28", "--cache", "taylorseer"]),
    ("8 steps, no cache", ["--steps", "8"]),
]


def main():
    model = ROOT / "target" / "bench" / "fill-medium"
    model.parent.mkdir(parents=True, exist_ok=True)
    prepare(model)
    out = ROOT / "target" / "bench" / "cache"
    out.mkdir(parents=True, exist_ok=True)
    big = ROOT / "target" / "bench" / "masked" / "photo.png"
    big.parent.mkdir(parents=True, exist_ok=True)
    photo(big)
    small = out / "photo.png"
    if not small.exists():
        from PIL import Image
        Image.open(big).resize((512, 384), Image.BICUBIC).save(small)
    subprocess.run(["cargo", "build", "--release", "-p", "icedit-cli"], cwd=ROOT, check=True)
    icedit = ROOT / "target" / "release" / "icedit"
    env = dict(os.environ, RAYON_NUM_THREADS=str(os.cpu_count()), HF_HUB_OFFLINE="1")
    base = [str(icedit), "edit", "--model", str(model), "--image", str(small), "--instruction",
            "make it night", "--no-lora", "--width", "256", "--seed", "42", "--dtype", "f32",
            "--quiet", "--json"]
    rows = []
    for name, flags in SETTINGS:
        start = time.perf_counter()
        res = subprocess.run(base + flags + ["--out", str(out / "out.png")], check=True, env=env,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - start
        summary = json.loads(res.stdout)["outputs"][0]
        rows.append((name, summary["transformer_evaluations"], summary["full_evaluations"], seconds))
        print(json.dumps(dict(setting=name, evaluations=rows[-1][1], full=rows[-1][2],
                              seconds=round(seconds, 1))), flush=True)
    base_s = rows[0][3]
    print("\n| setting | evaluations (computed in full) | whole job | vs 28 steps |")
    print("|---|---|---|---|")
    for name, evals, full, seconds in rows:
        print(f"| {name} | {evals} ({full}) | {seconds:.1f} s | {seconds / base_s:.2f}x |")


if __name__ == "__main__":
    main()
