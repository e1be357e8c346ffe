"""GGUF FLUX transformer forward: icedit (Rust, candle) vs diffusers (PyTorch), same machine, same run.

One transformer forward on CPU in f32 compute, with the weights read from

  f32    the dense diffusers-layout safetensors checkpoint (baseline; benches/transformer_bench.py's)
  q8_0   medium_q8_0.gguf: BFL tensor names, every 2-D weight whose rows are a multiple of 32 Q8_0
  q4_0   medium_q4_0.gguf: the same with Q4_0
         (other 2-D weights and all 1-D tensors F32; general.architecture = "flux")

Run from the repo root, in the reference venv:

  .venv-ref/bin/python benches/gguf_bench.py                 # medium config, 2 rounds, 2 reps
  .venv-ref/bin/python benches/gguf_bench.py --reps 3 --rounds 3

The random "medium" checkpoint and inputs come from transformer_bench.prepare (163M parameters,
FLUX.1 Fill widths, 1024 image + 512 text tokens, under target/bench/medium/); the GGUF files are
written next to them once (diffusers -> BFL conversion and GGUF writing by
tests/reference/gen_gguf.py's helpers) and reused.

Each engine runs in a fresh process per file and round (rounds alternate which engine goes first),
with the same thread count (torch.set_num_threads, RAYON_NUM_THREADS, OMP_NUM_THREADS): icedit
through `cargo bench --bench transformer_forward` (which takes a folder or a single .gguf file),
diffusers through transformer_bench's own torch side, with `from_pretrained` replaced for the GGUF
files by

  FluxTransformer2DModel.from_single_file(file, quantization_config=GGUFQuantizationConfig(
      compute_dtype=torch.float32), config=<medium transformer folder>, torch_dtype=torch.float32)

diffusers 0.42.1's BFL converter hard-codes FLUX.1's inner_dim = 3072 (the medium model is 768
wide), so gen_gguf.py's source-patched converter is installed first. diffusers' own GGUF decoder is
used as shipped: it dequantizes in float16 (scale products rounded to fp16), icedit in f32 (as
ggml), so the two engines' outputs differ a little more on the GGUF files than on f32. To tell
that apart from a forward mismatch, each output is also compared with a plain f32 diffusers model
holding gguf-py's numpy (float32) dequantization of the same file ("reference" below).

Reported per engine and file: load seconds, median forward seconds (REPS timed forwards after one
warm-up), peak RSS (MiB, the process's high-water mark over load + forward, read from the OS), file
size (MiB); ratios icedit/diffusers (forward: median of per-round ratios; load and RSS: ratio of
the medians; also the fastest single forward of each engine, the figure least disturbed by other
load on a shared machine); max abs differences. Table on stdout, everything in target/bench/gguf_bench.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
import transformer_bench as tb  # noqa: E402

GEN_DIR = ROOT / "tests" / "reference"
KINDS = ("f32", "q8_0", "q4_0")


def gen_gguf():
    """tests/reference/gen_gguf.py as a module (its main() is behind a __main__ guard)."""
    sys.path.insert(0, str(GEN_DIR))
    import gen_gguf as g

    return g


def gguf_path(out_dir, kind):
    return out_dir / f"medium_{kind}.gguf"


def write_ggufs(model_dir, out_dir):
    """medium_q8_0.gguf / medium_q4_0.gguf from the diffusers checkpoint, made once (cached)."""
    paths = {k: gguf_path(out_dir, k) for k in ("q8_0", "q4_0")}
    if all(p.exists() for p in paths.values()):
        return paths
    import torch
    from safetensors.torch import load_file

    g = gen_gguf()
    cfg = json.loads((model_dir / "config.json").read_text())
    sd = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        sd.update(load_file(f))
    bfl = g.to_bfl(sd, cfg)
    # the inverse is right: diffusers' own (patched) converter gives the checkpoint back
    back = g.PATCHED_CONVERTER(checkpoint=dict(bfl), config=cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    for kind, path in paths.items():
        if path.exists():
            continue
        qtype = {"q8_0": g.Q.Q8_0, "q4_0": g.Q.Q4_0}[kind]
        ftype = {"q8_0": g.gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": g.gguf.LlamaFileType.MOSTLY_Q4_0}[kind]
        block = g.gguf.GGML_QUANT_SIZES[qtype][0]
        types = {n: qtype if w.ndim == 2 and w.shape[1] % block == 0 else g.Q.F32 for n, w in bfl.items()}
        t = time.perf_counter()
        tmp = path.with_suffix(".gguf.tmp")
        g.write_model_gguf(tmp, bfl, types, ftype)
        tmp.rename(path)
        n_q = sum(t_ == qtype for t_ in types.values())
        print(f"wrote {path.name}: {n_q} {qtype.name} + {len(types) - n_q} F32 tensors, "
              f"{path.stat().st_size / 2**20:.1f} MiB ({time.perf_counter() - t:.0f}s)", flush=True)
    return paths


def torch_side_gguf(path, model_dir, inputs, out, reps, threads):
    """transformer_bench's torch side with from_pretrained replaced by the GGUF single-file load."""
    import torch
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    gen_gguf().install_converter()  # inner_dim from the config, not FLUX.1's 3072

    def load(model_dir, torch_dtype):
        return FluxTransformer2DModel.from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            config=str(model_dir), torch_dtype=torch_dtype, local_files_only=True)

    FluxTransformer2DModel.from_pretrained = staticmethod(load)
    tb.torch_side(model_dir, inputs, out, reps, "f32", "cpu", threads)


def reference_outputs(paths, model_dir, inputs, threads):
    """Plain f32 diffusers model holding gguf-py's numpy dequantization of each file: forward."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    g = gen_gguf()
    torch.set_num_threads(threads)
    cfg = json.loads((model_dir / "config.json").read_text())
    x = load_file(inputs)
    outs = {}
    for kind, path in paths.items():
        tensors, _ = g.read_gguf(path)
        deq = {n: torch.from_numpy(a) for n, (_, a) in tensors.items()}
        model = FluxTransformer2DModel.from_config(cfg).eval()
        model.load_state_dict(g.PATCHED_CONVERTER(checkpoint=deq, config=cfg))
        with torch.inference_mode():
            outs[kind] = model(hidden_states=x["img"], encoder_hidden_states=x["txt"],
                               pooled_projections=x["pooled"], timestep=x["timestep"],
                               img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                               return_dict=False)[0].float()
        del model, deq, tensors
    return outs


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=2, help="timed forwards per process")
    p.add_argument("--rounds", type=int, default=2, help="alternating diffusers/icedit runs")
    p.add_argument("--kinds", default=",".join(KINDS), help="subset of f32,q8_0,q4_0")
    p.add_argument("--no-reference", action="store_true", help="skip the numpy-dequantized reference")
    p.add_argument("--torch-side-gguf", nargs=4, metavar=("GGUF", "MODEL", "INPUTS", "OUT"),
                   help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_side_gguf:
        return torch_side_gguf(*a.torch_side_gguf, a.reps, a.threads)
    kinds = [k for k in a.kinds.split(",") if k]
    assert set(kinds) <= set(KINDS), kinds

    t_start = time.perf_counter()
    out_dir = ROOT / "target" / "bench" / "medium"
    model_dir, inputs = tb.prepare("medium", out_dir)
    paths = write_ggufs(model_dir, out_dir)
    models = {"f32": model_dir, **paths}
    sizes = {"f32": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
             **{k: v.stat().st_size for k, v in paths.items()}}

    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    cargo = ["cargo", "bench", "-q", "-p", "icedit-adapters", "--bench", "transformer_forward"]
    subprocess.run(cargo + ["--no-run"], cwd=ROOT, env=env, check=True)

    def outs(kind):
        return {e: out_dir / f"out_gguf_bench_{kind}_{e}.safetensors" for e in ("diffusers", "icedit")}

    def commands(kind):
        o = outs(kind)
        if kind == "f32":  # exactly transformer_bench's torch side
            torch_cmd = [sys.executable, str(ROOT / "benches" / "transformer_bench.py"),
                         "--config", "medium", "--dtype", "f32", "--device", "cpu",
                         "--threads", str(a.threads), "--reps", str(a.reps),
                         "--torch-side", str(model_dir), str(inputs), str(o["diffusers"])]
        else:
            torch_cmd = [sys.executable, __file__, "--threads", str(a.threads), "--reps", str(a.reps),
                         "--torch-side-gguf", str(models[kind]), str(model_dir), str(inputs),
                         str(o["diffusers"])]
        rust_cmd = cargo + ["--", str(models[kind]), str(inputs), str(o["icedit"]), str(a.reps),
                            "f32", "cpu"]
        return {"diffusers": torch_cmd, "icedit": rust_cmd}

    def run(cmd):
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["process_wall_s"] = round(time.perf_counter() - t, 2)
        r["loadavg_1m_before"] = round(load_before, 2)
        return r

    rounds = {k: [] for k in kinds}
    for i in range(a.rounds):
        order = ("diffusers", "icedit") if i % 2 == 0 else ("icedit", "diffusers")
        for kind in kinds:
            cmds = commands(kind)
            rd = {e: run(cmds[e]) for e in order}
            rounds[kind].append(rd)
            print(f"round {i + 1} {kind}: diffusers {rd['diffusers']['forward_s']:.3f}s "
                  f"(load {rd['diffusers']['load_s']:.2f}s, {rd['diffusers']['peak_rss_mib']} MiB), "
                  f"icedit {rd['icedit']['forward_s']:.3f}s (load {rd['icedit']['load_s']:.2f}s, "
                  f"{rd['icedit']['peak_rss_mib']} MiB), "
                  f"ratio {rd['icedit']['forward_s'] / rd['diffusers']['forward_s']:.3f}", flush=True)

    import torch
    from safetensors.torch import load_file

    ref = {} if a.no_reference else reference_outputs(
        {k: paths[k] for k in kinds if k != "f32"}, model_dir, inputs, a.threads)
    med = statistics.median
    results = {}
    for kind in kinds:
        rs = rounds[kind]
        summary = {e: {m: med([rd[e][m] for rd in rs]) for m in ("load_s", "forward_s", "peak_rss_mib")}
                   for e in ("diffusers", "icedit")}
        for e in ("diffusers", "icedit"):  # fastest single forward: least disturbed by other load
            summary[e]["forward_min_s"] = min(rd[e]["forward_min_s"] for rd in rs)
        summary["icedit"]["rss_after_load_mib"] = med([rd["icedit"]["rss_after_load_mib"] for rd in rs])
        o = {e: load_file(f)["out"] for e, f in outs(kind).items()}
        scale = float(o["diffusers"].abs().max())
        diff = {"icedit_vs_diffusers": float((o["icedit"] - o["diffusers"]).abs().max()),
                "max_abs_out_diffusers": scale}
        if kind in ref:
            diff["icedit_vs_reference"] = float((o["icedit"] - ref[kind]).abs().max())
            diff["diffusers_vs_reference"] = float((o["diffusers"] - ref[kind]).abs().max())
        results[kind] = {
            "file": str(models[kind].relative_to(ROOT)),
            "file_mib": round(sizes[kind] / 2**20, 1),
            **summary,
            "ratio_icedit_over_diffusers": {
                "forward_s": med([rd["icedit"]["forward_s"] / rd["diffusers"]["forward_s"] for rd in rs]),
                "forward_min_s": summary["icedit"]["forward_min_s"] / summary["diffusers"]["forward_min_s"],
                "load_s": summary["icedit"]["load_s"] / summary["diffusers"]["load_s"],
                "peak_rss_mib": summary["icedit"]["peak_rss_mib"] / summary["diffusers"]["peak_rss_mib"],
            },
            "max_abs_diff": diff,
            "threads": {e: rs[0][e]["threads"] for e in ("diffusers", "icedit")},
            "rounds": rs,
        }

    import diffusers
    import gguf  # noqa: F401

    from importlib.metadata import version
    report = {
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "loadavg_end": os.getloadavg()},
        "config": "medium", "compute_dtype": "f32", "device": "cpu", "threads": a.threads,
        "reps": a.reps, "rounds": a.rounds,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "gguf": version("gguf"),
                     "python": platform.python_version()},
        "notes": "diffusers' stock GGUF decoder dequantizes in float16 (icedit and the reference in f32); "
                 "diffusers' BFL converter patched for inner_dim (gen_gguf.py). Reference = plain f32 "
                 "diffusers model with gguf-py's numpy dequantization of the file.",
        "results": results,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    (ROOT / "target" / "bench" / "gguf_bench.json").write_text(json.dumps(report, indent=1))

    print(f"\nconfig=medium (163M params, 1024 img + 512 txt tokens) dtype=f32 device=cpu "
          f"threads={a.threads} reps={a.reps} rounds={a.rounds}; cpu: {report['machine']['cpu']}\n")
    print("| file | MiB | engine | load s | forward s (median) | forward s (min) | peak RSS MiB |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for kind, r in results.items():
        for e in ("diffusers", "icedit"):
            s = r[e]
            print(f"| {kind} | {r['file_mib']:.1f} | {e} | {s['load_s']:.2f} | {s['forward_s']:.3f} | "
                  f"{s['forward_min_s']:.3f} | {s['peak_rss_mib']:.0f} |")
    print("\n| file | icedit/diffusers load | forward (median) | forward (min) | peak RSS "
          "| max abs icedit-diffusers | icedit-ref | diffusers-ref | max abs out |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in results.items():
        q, d = r["ratio_icedit_over_diffusers"], r["max_abs_diff"]
        f = lambda k: f"{d[k]:.2e}" if k in d else "-"  # noqa: E731
        print(f"| {kind} | {q['load_s']:.3f} | {q['forward_s']:.3f} | {q['forward_min_s']:.3f} | "
              f"{q['peak_rss_mib']:.3f} | "
              f"{f('icedit_vs_diffusers')} | {f('icedit_vs_reference')} | {f('diffusers_vs_reference')} | "
              f"{d['max_abs_out_diffusers']:.3g} |")
    print(f"\n(ref = plain f32 diffusers model with gguf-py's numpy f32 dequantization of the file; "
          f"diffusers' stock GGUF decoder works in fp16.) total {report['total_wall_s']:.0f}s; "
          f"wrote target/bench/gguf_bench.json")


if __name__ == "__main__":
    main()
