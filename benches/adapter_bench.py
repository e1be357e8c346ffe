"""Adapter cost: FLUX transformer forward bare, with ICEdit's plain LoRA, and with its MoE-LoRA,
in icedit (Rust) and in the Python reference (diffusers + PEFT; the MoE reference of
tests/reference/gen_edit_adapters.py), same machine, same checkpoint and inputs.

  .venv-ref/bin/python benches/adapter_bench.py            # medium config, CPU f32

The adapters follow ../shared/SPEC.md section 4 at the real rank: rank 32, alpha 32, on ICEdit's
target modules; the MoE file has 4 experts of rank 32 with a router on every double-block
ff.net.2 and single-block proj_out (top-1), plain LoRA elsewhere. icedit runs each adapter
merged into the weights (its default; MoE layers stay at run time) and entirely at run time (as
PEFT does). The question the issue asks: does an MoE layer cost more than one extra LoRA?
Compare "moe runtime" with "lora runtime" (same layers, MoE in place of LoRA on 12 of them).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

RANK, ALPHA, EXPERTS = 32, 32, 4


def make_adapters(model_dir, out_dir):
    """ICEdit-shaped LoRA and MoE-LoRA for the benchmark model (seeded, made once)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    from gen_edit_adapters import diffusers_style_metadata, is_moe, target_modules
    from peft import LoraConfig

    lora, moe = out_dir / "lora.safetensors", out_dir / "moe.safetensors"
    if lora.exists() and moe.exists():
        return lora, moe
    model = FluxTransformer2DModel.from_pretrained(model_dir)
    modules = target_modules(model.config)
    g = torch.Generator().manual_seed(5)
    meta = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(modules)).to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    plain, mixed = {}, {}
    for m in modules:
        out_f, in_f = model.get_submodule(m).weight.shape
        a = lambda: torch.randn(RANK, in_f, generator=g) / in_f**0.5  # noqa: E731
        b = lambda: torch.randn(out_f, RANK, generator=g) * 0.01  # noqa: E731
        plain[f"transformer.{m}.lora_A.weight"] = a()
        plain[f"transformer.{m}.lora_B.weight"] = b()
        if is_moe(m):
            for k in range(EXPERTS):
                mixed[f"transformer.{m}.lora_A.expert_{k}.weight"] = a()
                mixed[f"transformer.{m}.lora_B.expert_{k}.weight"] = b()
            mixed[f"transformer.{m}.lora_route.weight"] = torch.randn(EXPERTS, in_f, generator=g)
        else:
            mixed[f"transformer.{m}.lora_A.weight"] = plain[f"transformer.{m}.lora_A.weight"]
            mixed[f"transformer.{m}.lora_B.weight"] = plain[f"transformer.{m}.lora_B.weight"]
    metadata = diffusers_style_metadata(meta)
    save_file({k: v.contiguous() for k, v in plain.items()}, lora, metadata=metadata)
    save_file({k: v.contiguous() for k, v in mixed.items()}, moe, metadata=metadata)
    return lora, moe


def torch_side(model_dir, inputs, out_path, variant, adapter, reps, threads):
    """One variant in a fresh process: bare, lora (PEFT) or moe (PEFT + the MoE reference)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(threads)
    model = FluxTransformer2DModel.from_pretrained(model_dir).eval()
    if variant == "lora":
        model.load_lora_adapter(adapter, prefix="transformer", adapter_name="edit")
    elif variant == "moe":
        from gen_edit_adapters import MoELoRALinear, is_moe

        sd = load_file(adapter)
        plain = {k: v for k, v in sd.items() if ".expert_" not in k and ".lora_route" not in k}
        model.load_lora_adapter(plain, prefix="transformer", adapter_name="edit")
        for m in sorted({k.split(".lora_")[0].removeprefix("transformer.") for k in sd}):
            if not is_moe(m):
                continue
            a = [sd[f"transformer.{m}.lora_A.expert_{k}.weight"] for k in range(EXPERTS)]
            b = [sd[f"transformer.{m}.lora_B.expert_{k}.weight"] for k in range(EXPERTS)]
            layer = MoELoRALinear(model.get_submodule(m), sd[f"transformer.{m}.lora_route.weight"],
                                  a, b, ALPHA / RANK, 1)
            parent, child = m.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, layer)
    x = load_file(inputs)

    def forward():
        with torch.inference_mode():
            return model(hidden_states=x["img"], encoder_hidden_states=x["txt"],
                         pooled_projections=x["pooled"], timestep=x["timestep"],
                         img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                         return_dict=False)[0]

    out = forward()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = forward()
        times.append(time.perf_counter() - t)
    save_file({"out": out.float().contiguous()}, out_path)
    print(json.dumps(dict(forward_s=statistics.median(times))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="medium")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=3, help="timed forwards per process")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all variants")
    p.add_argument("--torch-side", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_side:
        model_dir, inputs, out, variant, adapter = a.torch_side
        return torch_side(model_dir, inputs, out, variant, adapter, a.reps, a.threads)

    from transformer_bench import prepare

    out_dir = ROOT / "target" / "bench" / a.config
    model_dir, inputs = prepare(a.config, out_dir)
    lora, moe = make_adapters(model_dir, out_dir)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    cargo = ["cargo", "bench", "-q", "-p", "icedit-adapters", "--bench", "transformer_forward"]
    subprocess.run(cargo + ["--no-run"], cwd=ROOT, env=env, check=True)

    def run(cmd):
        res = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
        return json.loads(res.stdout.strip().splitlines()[-1])["forward_s"]

    def torch_cmd(variant, adapter):
        out = out_dir / f"out_torch_{variant}.safetensors"
        return [sys.executable, __file__, "--reps", str(a.reps), "--threads", str(a.threads),
                "--torch-side", str(model_dir), str(inputs), str(out), variant, str(adapter)], out

    def rust_cmd(name, adapter=None, mode=None):
        out = out_dir / f"out_rust_{name}.safetensors"
        cmd = cargo + ["--", str(model_dir), str(inputs), str(out), str(a.reps), "f32", "cpu"]
        if adapter:
            cmd += [str(adapter), mode]
        return cmd, out

    variants = {
        "diffusers bare": torch_cmd("bare", ""),
        "diffusers lora (PEFT)": torch_cmd("lora", lora),
        "diffusers moe (PEFT + dense MoE)": torch_cmd("moe", moe),
        "icedit bare": rust_cmd("bare"),
        "icedit lora merged": rust_cmd("lora_merge", lora, "merge"),
        "icedit lora runtime": rust_cmd("lora_runtime", lora, "runtime"),
        "icedit moe merged": rust_cmd("moe_merge", moe, "merge"),
        "icedit moe runtime": rust_cmd("moe_runtime", moe, "runtime"),
    }
    times = {name: [] for name in variants}
    for i in range(a.rounds):
        for name, (cmd, _) in variants.items():
            times[name].append(run(cmd))
            print(f"round {i + 1}: {name:34} {times[name][-1]:.3f}s", flush=True)

    from safetensors.torch import load_file

    out = {name: load_file(path)["out"] for name, (_, path) in variants.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\nconfig={a.config} threads={a.threads} reps={a.reps} rounds={a.rounds} (medians)")
    for name, t in med.items():
        ref = {"icedit bare": "diffusers bare", "icedit lora merged": "diffusers lora (PEFT)",
               "icedit lora runtime": "diffusers lora (PEFT)",
               "icedit moe merged": "diffusers moe (PEFT + dense MoE)",
               "icedit moe runtime": "diffusers moe (PEFT + dense MoE)"}.get(name)
        extra = ""
        if ref:
            diff = (out[name] - out[ref]).abs().max().item()
            extra = f"  {t / med[ref]:.2f}x {ref.split(' (')[0]}, max |diff| {diff:.1e}"
        print(f"{name:34} {t:7.3f}s  {t / med['icedit bare' if name.startswith('icedit') else 'diffusers bare']:.3f}x bare{extra}")
    lora_cost = med["icedit lora runtime"] - med["icedit bare"]
    moe_extra = med["icedit moe runtime"] - med["icedit lora runtime"]
    print(f"\nicedit: all LoRA layers at run time cost {lora_cost:+.3f}s; MoE layers in place of LoRA on "
          f"the ff.net.2 / proj_out layers cost {moe_extra:+.3f}s more")
    print(f"icedit moe merged / lora merged: {med['icedit moe merged'] / med['icedit lora merged']:.3f}x")


if __name__ == "__main__":
    main()
