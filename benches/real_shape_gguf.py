"""FLUX.1 Fill at its real shape (11.9B parameters, random weights) as a GGUF: load and one forward.

Writes the real transformer's every tensor, in BFL naming and shapes, straight into a GGUF file
(random ggml blocks: a scale in [5e-4, 2e-3] and random quants; nothing is ever materialised in
f32), the way the community's files are laid out: the block matrices in TYPE, the input embedders
and the final layer F16, 1-D tensors F32. Then, in a fresh process,

  icedit inspect --model FILE --dtype f32 --forward 64x64 --text-tokens 16

loads it on the CPU (the matrices stay in ggml blocks) and times one forward at a small token
count (16 image + 16 text tokens: every layer's weight is still dequantized for its product).
Reported: the file size, icedit's load seconds, the forward seconds, the process's peak RSS
(VmHWM, read by /usr/bin/time) against the file size, and the seconds to read the file once
(`cat FILE > /dev/null`, right after writing it, so the page cache is what it is for both).

  .venv-ref/bin/python benches/real_shape_gguf.py --type q4_0     # 6.7 GB file under target/bench
  .venv-ref/bin/python benches/real_shape_gguf.py --type q8_0     # 12.7 GB
  .venv-ref/bin/python benches/real_shape_gguf.py --type q4_0 --keep   # leave the file

The file is deleted afterwards unless --keep (they are large); the figures go to stdout and to
target/bench/real_shape_<type>.json.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

ROOT = Path(__file__).resolve().parents[1]
H, MLP, HEAD = 3072, 12288, 128
DOUBLE, SINGLE = 19, 38
# ggml block layouts: (elements per block, bytes per block, bytes of the f16 scale at its start)
BLOCKS = {"q8_0": (T.Q8_0, 32, 34), "q4_0": (T.Q4_0, 32, 18)}


def tensors():
    """(name, shape as [rows, cols] or [n]) of FLUX.1 Fill's transformer in BFL naming."""
    out = [("img_in", [H, 384]), ("txt_in", [H, 4096])]
    for emb, width in [("time_in", 256), ("vector_in", 768), ("guidance_in", 256)]:
        out += [(f"{emb}.in_layer", [H, width]), (f"{emb}.out_layer", [H, H])]
    for i in range(DOUBLE):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            out += [
                (f"{p}_mod.lin", [6 * H, H]),
                (f"{p}_attn.qkv", [3 * H, H]),
                (f"{p}_attn.proj", [H, H]),
                (f"{p}_mlp.0", [MLP, H]),
                (f"{p}_mlp.2", [H, MLP]),
            ]
            out += [(f"{p}_attn.norm.query_norm.scale", [HEAD]), (f"{p}_attn.norm.key_norm.scale", [HEAD])]
    for i in range(SINGLE):
        p = f"single_blocks.{i}"
        out += [
            (f"{p}.linear1", [3 * H + MLP, H]),
            (f"{p}.linear2", [H, H + MLP]),
            (f"{p}.modulation.lin", [3 * H, H]),
            (f"{p}.norm.query_norm.scale", [HEAD]),
            (f"{p}.norm.key_norm.scale", [HEAD]),
        ]
    out += [("final_layer.linear", [64, H]), ("final_layer.adaLN_modulation.1", [2 * H, H])]
    # Linears get .weight and .bias; norm scales are already named.
    named = []
    for name, shape in out:
        if name.endswith(".scale"):
            named.append((name, shape))
        else:
            named += [(f"{name}.weight", shape), (f"{name}.bias", [shape[0]])]
    return named


KEPT_HIGH = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def plan(kind):
    """(name, shape, ggml type, bytes) per tensor."""
    qtype, per_block, block_bytes = BLOCKS[kind]
    planned = []
    for name, shape in tensors():
        n = int(np.prod(shape))
        if len(shape) == 1:
            planned.append((name, shape, T.F32, 4 * n))
        elif name.startswith(KEPT_HIGH):
            planned.append((name, shape, T.F16, 2 * n))
        else:
            planned.append((name, shape, qtype, n // per_block * block_bytes))
    return planned


def random_tensor(rng, shape, ggml, kind):
    n = int(np.prod(shape))
    if ggml == T.F32:
        # Norm scales near 1, biases near 0.
        return (1.0 + 0.01 * rng.standard_normal(n)).astype(np.float32) if len(shape) == 1 and shape[0] == HEAD \
            else (0.01 * rng.standard_normal(n)).astype(np.float32)
    if ggml == T.F16:
        return (0.02 * rng.standard_normal(shape)).astype(np.float16)
    _, per_block, block_bytes = BLOCKS[kind]
    blocks = n // per_block
    raw = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    scales = rng.uniform(5e-4, 2e-3, size=blocks).astype(np.float16)
    raw[:, :2] = scales.view(np.uint8).reshape(blocks, 2)
    return raw.reshape(shape[0], -1)


def write(path, kind):
    rng = np.random.default_rng(0)
    planned = plan(kind)
    writer = GGUFWriter(str(path), "flux")
    writer.add_file_type({"q8_0": 7, "q4_0": 2}[kind])
    _, per_block, block_bytes = BLOCKS[kind]
    for name, shape, ggml, nbytes in planned:
        dtype = {T.F32: np.float32, T.F16: np.float16}.get(ggml, np.uint8)
        # gguf-py takes a quantized tensor's shape in bytes per row.
        stored = shape if dtype != np.uint8 else [shape[0], shape[1] // per_block * block_bytes]
        writer.add_tensor_info(name, stored, np.dtype(dtype), nbytes, raw_dtype=ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, ggml, nbytes in planned:
        tensor = random_tensor(rng, shape, ggml, kind)
        assert tensor.nbytes == nbytes, (name, tensor.nbytes, nbytes)
        writer.write_tensor_data(tensor)
    writer.close()
    params = sum(int(np.prod(s)) for _, s, _, _ in planned)
    return params


def icedit_binary():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "icedit-cli"], cwd=ROOT, check=True)
    return ROOT / "target" / "release" / "icedit"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--type", choices=sorted(BLOCKS), default="q4_0")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    out_dir = ROOT / "target" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"flux_fill_real_{args.type}.gguf"
    binary = icedit_binary()
    start = time.time()
    params = write(path, args.type)
    write_s = time.time() - start
    size = path.stat().st_size
    start = time.time()
    subprocess.run(f"cat '{path}' > /dev/null", shell=True, check=True)
    read_s = time.time() - start
    run = subprocess.run(
        ["/usr/bin/time", "-v", str(binary), "inspect", "--model", str(path), "--dtype", "f32",
         "--forward", "64x64", "--text-tokens", "16"],
        capture_output=True, text=True,
    )
    if run.returncode != 0:
        sys.exit(f"icedit failed:\n{run.stdout}\n{run.stderr}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    load_s = float(re.search(r"loaded .* in ([\d.]+)s", run.stdout).group(1))
    forward = re.search(r"median ([\d.]+)s", run.stdout)
    result = {
        "type": args.type,
        "parameters": params,
        "file_bytes": size,
        "write_seconds": round(write_s, 1),
        "read_file_once_seconds": round(read_s, 2),
        "icedit_load_seconds": load_s,
        "icedit_forward_seconds": float(forward.group(1)) if forward else None,
        "icedit_peak_rss_bytes": peak_kib * 1024,
        "peak_rss_over_file": round(peak_kib * 1024 / size, 3),
        "icedit_stdout": run.stdout,
    }
    (out_dir / f"real_shape_{args.type}.json").write_text(json.dumps(result, indent=2))
    mib = 1 << 20
    print(run.stdout)
    print(f"{args.type}: {params / 1e9:.2f}B parameters, file {size / mib:.0f} MiB (written in {write_s:.0f} s)")
    print(f"  read once: {read_s:.1f} s; icedit load {load_s:.1f} s = {load_s / read_s:.2f}x")
    print(f"  peak RSS {peak_kib * 1024 / mib:.0f} MiB = {peak_kib * 1024 / size:.3f}x the file")
    if forward:
        print(f"  one forward (16 + 16 tokens): {forward.group(1)} s")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
