"""Reads the GGUF files `icedit quantize` wrote (tests/fixtures/quantize/, from the tiny
pipeline's diffusers-layout transformer) with the Python tools and records what they see:

  tests/fixtures/quantize/reference.safetensors   gguf-py's numpy dequantization of every tensor
                                                  (`<file>/<tensor>`), and diffusers' forward of
                                                  each file (`out.<file>`) on the inputs of
                                                  tests/fixtures/gguf/forward.safetensors
  tests/fixtures/quantize/reference.json          metadata and tensor types gguf-py read, and
                                                  how far each forward is from the f32 model's

diffusers loads each with FluxTransformer2DModel.from_single_file(path,
quantization_config=GGUFQuantizationConfig(compute_dtype=float32), config=<tiny transformer>),
with gen_gguf.py's two patches (the BFL converter's hard-coded width, and gguf-py's numpy
decoder in place of diffusers' fp16 one). Run from the repo root after writing the files:

  for t in q8_0 q4_0; do target/debug/icedit quantize --model tests/fixtures/fill_pipeline/tiny \\
      --type $t --out tests/fixtures/quantize/tiny_$t.gguf --quiet; done
  .venv-ref/bin/python tests/reference/check_quantized.py
"""

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
from safetensors.torch import load_file, save_file

import gen_gguf

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "quantize"
TINY = ROOT / "tests" / "fixtures" / "fill_pipeline" / "tiny" / "transformer"
FILES = ["tiny_q8_0.gguf", "tiny_q4_0.gguf"]


def main():
    torch.set_num_threads(1)
    gen_gguf.install_converter()
    gen_gguf.install_dequant()
    inputs = load_file(str(ROOT / "tests" / "fixtures" / "gguf" / "forward.safetensors"))
    fx = {k: inputs[k] for k in ["hidden_states", "encoder_hidden_states", "pooled_projections",
                                 "timestep", "guidance", "txt_ids", "img_ids"]}
    dense = FluxTransformer2DModel.from_pretrained(str(TINY), torch_dtype=torch.float32).eval()
    out_f32 = gen_gguf.forward(dense, fx)
    tensors, meta = {"out.f32": out_f32.contiguous()}, {"files": {}}
    for name in FILES:
        path = OUT / name
        read, md = gen_gguf.read_gguf(path)
        for tname, (_, values) in read.items():
            tensors[f"{name}/{tname}"] = torch.from_numpy(np.ascontiguousarray(values))
        model = FluxTransformer2DModel.from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            config=str(TINY), torch_dtype=torch.float32, local_files_only=True).eval()
        out = gen_gguf.forward(model, fx)
        tensors[f"out.{name}"] = out.contiguous()
        meta["files"][name] = {
            "metadata": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in md.items()},
            "types": {t: str(q.name) for t, (q, _) in sorted(read.items())},
            "forward_max_abs_diff_vs_f32": float((out - out_f32).abs().max()),
        }
    save_file(tensors, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: v["forward_max_abs_diff_vs_f32"] for k, v in meta["files"].items()}))


if __name__ == "__main__":
    main()
