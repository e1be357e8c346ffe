"""FLUX transformer forward: icedit (Rust, candle) vs diffusers (PyTorch), same machine, same run.

Builds a random checkpoint of the given shape once (diffusers layout, f32, under
target/bench/), then times one forward pass in each engine with the same thread count on the
same inputs, checks that both computed the same thing, and prints the ratio and memory.

  .venv-ref/bin/python benches/transformer_bench.py                      # "medium", CPU f32
  .venv-ref/bin/python benches/transformer_bench.py --config full --device cuda --dtype bf16
  .venv-ref/bin/python benches/transformer_bench.py --config kontext-medium   # one Kontext step

A Kontext step is one transformer pass over the output's tokens and the photo's (ids with first
coordinate 1) after them: the "kontext-*" configs time that pass, the step's whole cost but the
Euler update.

Peak RSS is each process's high-water mark (load + forward), read from the OS. On a shared or
small machine timings drift by 10% or more between runs, so the engines run in alternating
rounds (fresh processes each) and the reported ratio is the median of the per-round ratios.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    # ../shared/SPEC.md section 5: 163M parameters, 1024 image + 512 text tokens.
    "medium": dict(model=dict(num_layers=4, num_single_layers=8, attention_head_dim=128,
                              num_attention_heads=6),
                   grid=(32, 32), txt_len=512),
    # FLUX.1 Fill at 1024x512 pixels: 2048 image + 512 text tokens.
    "full": dict(model=dict(num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24),
                 grid=(32, 64), txt_len=512),
}
# FLUX.1 Kontext at 512x512 from a 512x512 photo: 1024 output + 1024 photo + 512 text tokens.
CONFIGS["kontext-medium"] = dict(CONFIGS["medium"], photo_grid=(32, 32), kontext=True)
# FLUX.1 Kontext at 1024x1024 from a 1024x1024 photo: 4096 + 4096 + 512 tokens.
CONFIGS["kontext-full"] = dict(CONFIGS["full"], grid=(64, 64), photo_grid=(64, 64), kontext=True)
FILL = dict(in_channels=384, out_channels=64, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=[16, 56, 56])
KONTEXT = dict(FILL, in_channels=64)


def prepare(name, out_dir):
    """Random checkpoint + inputs, made once and reused (seeded, so identical across runs)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    cfg = CONFIGS[name]
    model_dir, inputs = out_dir / "transformer", out_dir / "inputs.safetensors"
    if (model_dir / "config.json").exists() and inputs.exists():
        return model_dir, inputs
    torch.manual_seed(0)
    channels = KONTEXT if cfg.get("kontext") else FILL
    model = FluxTransformer2DModel(**channels, **cfg["model"])
    model.save_pretrained(model_dir, max_shard_size="2GB")

    def grid_ids(h, w, first):
        ids = torch.zeros(h, w, 3)
        ids[..., 0] = first
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return ids.reshape(-1, 3)

    ids = [grid_ids(*cfg["grid"], 0)]
    if "photo_grid" in cfg:
        ids.append(grid_ids(*cfg["photo_grid"], 1))
    ids = torch.cat(ids)
    save_file(dict(
        img=torch.randn(1, ids.shape[0], channels["in_channels"]),
        img_ids=ids,
        txt=torch.randn(1, cfg["txt_len"], FILL["joint_attention_dim"]),
        txt_ids=torch.zeros(cfg["txt_len"], 3),
        pooled=torch.randn(1, FILL["pooled_projection_dim"]),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([0.05]),
    ), inputs)
    return model_dir, inputs


def torch_side(model_dir, inputs, out_path, reps, dtype, device, threads):
    """Runs in a fresh process so that its peak RSS is its own."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(threads)
    dt = dict(f32=torch.float32, bf16=torch.bfloat16, f16=torch.float16)[dtype]
    t0 = time.perf_counter()
    model = FluxTransformer2DModel.from_pretrained(model_dir, torch_dtype=dt).to(device).eval()
    load_s = time.perf_counter() - t0
    x = {k: v.to(device) for k, v in load_file(inputs).items()}
    for k in ("img", "txt", "pooled", "timestep", "guidance"):
        x[k] = x[k].to(dt)

    def forward():
        with torch.inference_mode():
            out = model(hidden_states=x["img"], encoder_hidden_states=x["txt"],
                        pooled_projections=x["pooled"], timestep=x["timestep"],
                        img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                        return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = forward()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = forward()
        times.append(time.perf_counter() - t)
    save_file({"out": out.float().cpu().contiguous()}, out_path)
    print(json.dumps(dict(load_s=round(load_s, 3), forward_s=statistics.median(times),
                          forward_min_s=min(times),
                          peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                          threads=torch.get_num_threads())))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="medium", choices=CONFIGS)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=5, help="timed forwards per process")
    p.add_argument("--rounds", type=int, default=3, help="alternating diffusers/icedit runs")
    p.add_argument("--cargo-features", default="", help="e.g. 'cuda,flash-attn'")
    p.add_argument("--torch-side", nargs=3, metavar=("MODEL", "INPUTS", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_side:
        return torch_side(*a.torch_side, a.reps, a.dtype, a.device, a.threads)

    out_dir = ROOT / "target" / "bench" / a.config
    model_dir, inputs = prepare(a.config, out_dir)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))

    torch_out = out_dir / "out_torch.safetensors"
    rust_out = out_dir / "out_rust.safetensors"
    torch_cmd = [sys.executable, __file__, "--config", a.config, "--dtype", a.dtype,
                 "--device", a.device, "--threads", str(a.threads), "--reps", str(a.reps),
                 "--torch-side", str(model_dir), str(inputs), str(torch_out)]
    cargo = ["cargo", "bench", "-q", "-p", "icedit-adapters", "--bench", "transformer_forward"]
    if a.cargo_features:
        cargo += ["--features", a.cargo_features]
    # Build first so that compiling is not timed or interleaved with a round.
    subprocess.run(cargo + ["--no-run"], cwd=ROOT, env=env, check=True)
    rust_cmd = cargo + ["--", str(model_dir), str(inputs), str(rust_out), str(a.reps), a.dtype,
                        a.device]

    def run(cmd, cwd=None):
        res = subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True, text=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    rounds = []
    for i in range(a.rounds):
        t, r = run(torch_cmd), run(rust_cmd, cwd=ROOT)
        rounds.append((t, r))
        print(f"round {i + 1}: diffusers {t['forward_s']:.3f}s, icedit {r['forward_s']:.3f}s, "
              f"ratio {r['forward_s'] / t['forward_s']:.3f}", flush=True)

    from safetensors.torch import load_file
    diff = (load_file(rust_out)["out"] - load_file(torch_out)["out"]).abs().max().item()

    med = lambda xs: statistics.median(xs)  # noqa: E731
    summary = {name: {k: med([rd[i][k] for rd in rounds]) for k in ("forward_s", "load_s", "peak_rss_mib")}
               for i, name in enumerate(("diffusers", "icedit"))}
    print(f"config={a.config} dtype={a.dtype} device={a.device} threads={a.threads} "
          f"reps={a.reps} rounds={a.rounds}")
    print(f"{'':10}{'forward (median)':>18}{'load':>10}{'peak RSS':>12}")
    for name, r in summary.items():
        print(f"{name:10}{r['forward_s']:>17.3f}s{r['load_s']:>9.2f}s{r['peak_rss_mib']:>8.0f} MiB")
    ratio = med([r["forward_s"] / t["forward_s"] for t, r in rounds])
    print(f"ratio icedit/diffusers (forward, median of rounds): {ratio:.3f}x")
    print(f"icedit RSS after load: {rounds[-1][1]['rss_after_load_mib']} MiB; "
          f"max |icedit - diffusers| = {diff:.2e}")


if __name__ == "__main__":
    main()
