"""End to end `icedit fill` vs diffusers' FluxFillPipeline, same machine, same inputs.

Builds a random "medium" Fill pipeline once under target/bench/fill-medium/ (the tokenizers of
the test fixture; CLIP-L's real shape; a 4-layer T5 of width 1024; the 163M transformer of
transformer_bench.py's "medium" config with joint_attention_dim 1024; the real FLUX VAE shape),
then times whole processes: load, encode the prompt, denoise, decode, write the PNG.
Both sides get the same seed, so the outputs must agree; the script checks it.

  .venv-ref/bin/python benches/fill_bench.py                 # 512x512, 4 steps, CPU f32
  .venv-ref/bin/python benches/fill_bench.py --size 1024 --steps 8

Engines run in alternating rounds (fresh processes) and the reported ratio is the median of the
per-round ratios; peak RSS is each process's high-water mark.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fill_pipeline" / "tiny"
PROMPT = "a red scarf on a wooden table, soft light"


def prepare(out):
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if (out / "model_index.json").exists():
        return
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(FIXTURE / name, tmp / name)
    shutil.copy(FIXTURE / "model_index.json", tmp / "model_index.json")
    torch.manual_seed(0)
    clip_vocab = len(json.loads((FIXTURE / "tokenizer" / "vocab.json").read_text()))
    t5_vocab = json.loads((FIXTURE / "text_encoder_2" / "config.json").read_text())["vocab_size"]
    CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=768, intermediate_size=3072, projection_dim=768,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )).save_pretrained(tmp / "text_encoder")
    T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=1024, d_kv=64, d_ff=2816, num_layers=4, num_heads=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )).save_pretrained(tmp / "text_encoder_2")
    FluxTransformer2DModel(
        in_channels=384, out_channels=64, num_layers=4, num_single_layers=8,
        attention_head_dim=128, num_attention_heads=6, joint_attention_dim=1024,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
    ).save_pretrained(tmp / "transformer")
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
        layers_per_block=2, latent_channels=16, norm_num_groups=32, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    ).save_pretrained(tmp / "vae")
    tmp.rename(out)


def inputs(out, size):
    import numpy as np
    from PIL import Image

    image, mask = out / f"image{size}.png", out / f"mask{size}.png"
    if not image.exists():
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:size, 0:size]
        pix = np.stack([128 + 100 * np.sin(x / 23), 128 + 100 * np.cos(y / 17), 128 + 0 * x], -1)
        pix = np.clip(pix + rng.normal(0, 10, pix.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pix).save(image)
        m = np.zeros((size, size), np.uint8)
        m[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
        Image.fromarray(m).save(mask)
    return image, mask


def torch_side(model, image, mask, size, steps, out_png):
    """Runs in a child process: the whole diffusers job, as a user script would."""
    import torch
    from diffusers import FluxFillPipeline
    from PIL import Image

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    pipe = FluxFillPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        prompt=PROMPT, image=Image.open(image), mask_image=Image.open(mask), height=size,
        width=size, num_inference_steps=steps, guidance_scale=30.0,
        generator=torch.Generator("cpu").manual_seed(42),
    ).images[0]
    result.save(out_png)


def timed(cmd, env=None):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--torch-side", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_side:
        m, i, k, s, n, o = args.torch_side
        torch_side(m, i, k, int(s), int(n), o)
        return

    out = ROOT / "target" / "bench" / "fill-medium"
    out.parent.mkdir(parents=True, exist_ok=True)
    prepare(out)
    image, mask = inputs(out, args.size)
    subprocess.run(["cargo", "build", "--release", "-p", "icedit-cli"], cwd=ROOT, check=True)
    icedit = ROOT / "target" / "release" / "icedit"
    env = dict(os.environ, BENCH_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1")
    torch_png, rust_png = out / "diffusers.png", out / "icedit.png"
    torch_cmd = [sys.executable, __file__, "--torch-side", str(out), str(image), str(mask),
                 str(args.size), str(args.steps), str(torch_png)]
    rust_cmd = [str(icedit), "fill", "--model", str(out), "--image", str(image), "--mask", str(mask),
                "--prompt", PROMPT, "--steps", str(args.steps), "--guidance", "30", "--seed", "42",
                "--dtype", "f32", "--out", str(rust_png), "--quiet"]
    ratios, rows = [], []
    for r in range(args.rounds):
        t_s = timed(torch_cmd, env)
        r_s = timed(rust_cmd, env)
        ratios.append(r_s / t_s)
        rows.append((t_s, r_s))
        print(f"round {r + 1}: diffusers {t_s:.2f}s, icedit {r_s:.2f}s, ratio {r_s / t_s:.2f}")
    # Peak memory measured separately, one process at a time, so each is its own maximum.
    rss = {}
    for name, cmd in (("diffusers", torch_cmd), ("icedit", rust_cmd)):
        pid = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(pid.pid, 0)
        rss[name] = usage.ru_maxrss / 1024

    import numpy as np
    from PIL import Image

    diff = np.abs(np.asarray(Image.open(torch_png)).astype(int) - np.asarray(Image.open(rust_png)).astype(int))
    print(f"\n{args.size}x{args.size}, {args.steps} steps, f32 CPU, {args.threads} threads")
    print(f"diffusers median {statistics.median(t for t, _ in rows):.2f}s, "
          f"icedit median {statistics.median(r for _, r in rows):.2f}s, "
          f"ratio (median of rounds) {statistics.median(ratios):.2f}x")
    print(f"peak RSS: diffusers {rss['diffusers']:.0f} MiB, icedit {rss['icedit']:.0f} MiB "
          f"({rss['icedit'] / rss['diffusers']:.2f}x)")
    print(f"outputs: max diff {diff.max()}/255, mean {diff.mean():.3f}/255")


if __name__ == "__main__":
    main()
