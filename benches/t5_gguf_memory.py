"""Peak memory of encoding a prompt with a GGUF T5 (Q8_0, llama.cpp naming): icedit, which keeps
the matrices quantized, against transformers, which dequantizes the file at load
(`T5EncoderModel.from_pretrained(..., gguf_file=)`), and against icedit before it kept them (an
earlier binary given as --before). A random "medium" T5 (d_model 2048, d_ff 5120, 8 layers, 32
heads; 452M parameters, tiny vocabulary) stands in for T5-XXL (4.8B).

  .venv-ref/bin/python benches/t5_gguf_memory.py [--before OLD_ICEDIT]

icedit runs `icedit edit` on a copy of the tiny Fill pipeline whose T5 config is the medium one:
the run encodes the prompt, frees the encoder and then stops at the tiny transformer (whose text
width does not match), so its peak RSS is the encoding's.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "fill_pipeline" / "tiny"
OUT = ROOT / "target" / "bench" / "t5-gguf"


def prepare():
    sys.path.insert(0, str(ROOT / "tests" / "reference"))
    import gguf
    import torch
    from transformers import T5Config, T5EncoderModel
    import gen_t5_gguf_fp8 as gen

    gguf_path = OUT / "t5_medium_q8_0.gguf"
    pipe = OUT / "pipeline"
    if gguf_path.exists() and pipe.exists():
        return gguf_path, pipe
    OUT.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((TINY / "text_encoder_2" / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=vocab, d_model=2048, d_kv=64, d_ff=5120, num_layers=8, num_heads=32,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = T5EncoderModel(cfg).eval()
    tensors = gen.t5_to_gguf_tensors(model)
    gen.write_t5_gguf(gguf_path, tensors, "q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, cfg)
    shutil.rmtree(pipe, ignore_errors=True)
    shutil.copytree(TINY, pipe)
    model.config.save_pretrained(pipe / "text_encoder_2")
    (pipe / "text_encoder_2" / "model.safetensors").unlink(missing_ok=True)
    return gguf_path, pipe


def icedit_peak(binary, gguf_path, pipe):
    out = OUT / "out.png"
    cmd = ["/usr/bin/time", "-f", "%M", str(binary), "edit", "--model", str(pipe),
           "--text-encoder-2", str(gguf_path), "--image", str(ROOT / "tests/fixtures/edit/source.png"),
           "--instruction", "make it night", "--no-lora", "--width", "64", "--steps", "1",
           "--dtype", "f32", "--max-seq-len", "64", "--quiet", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    lines = [l for l in run.stderr.strip().splitlines() if not l.startswith("Command exited")]
    return int(lines[-1]) / 1024, lines[-2] if len(lines) > 1 else "(finished)"


def transformers_peak(gguf_path):
    code = f"""
import resource, torch
from transformers import T5EncoderModel
m = T5EncoderModel.from_pretrained({str(gguf_path.parent)!r}, gguf_file={gguf_path.name!r}, torch_dtype=torch.float32)
ids = torch.ones((1, 64), dtype=torch.long)
with torch.no_grad():
    m(ids)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return float(run.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="an icedit binary from before T5 was kept quantized")
    args = parser.parse_args()
    gguf_path, pipe = prepare()
    subprocess.run(["cargo", "build", "--release", "-p", "icedit-cli"], cwd=ROOT, check=True)
    size = gguf_path.stat().st_size / 2**20
    now, why = icedit_peak(ROOT / "target" / "release" / "icedit", gguf_path, pipe)
    print(f"file {size:.0f} MiB; icedit stops with: {why}")
    rows = [("icedit (matrices kept quantized)", now)]
    if args.before:
        rows.append(("icedit before (dequantized at load)", icedit_peak(args.before, gguf_path, pipe)[0]))
    ref = transformers_peak(gguf_path)
    rows.append(("transformers (dequantized at load)", ref))
    print("\n| run | peak RSS MiB | vs transformers |\n|---|---|---|")
    for name, peak in rows:
        print(f"| {name} | {peak:.0f} | {peak / ref:.2f}x |")


if __name__ == "__main__":
    main()
