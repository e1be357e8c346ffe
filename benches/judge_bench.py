"""One judge comparison, `icedit judge` vs the transformers reference, on random models with the
real shapes of openai/clip-vit-large-patch14 and Qwen/Qwen3-VL-2B-Instruct, CPU f32.

  .venv-ref/bin/python benches/judge_bench.py                          # both judges, 3 rounds
  .venv-ref/bin/python benches/judge_bench.py --judges clip --rounds 5

Models are built once (random init) under target/bench/: clip-large/ (f32) and qwen3vl-2b/
(bf16, ~4.3 GB, loaded as f32 by both sides), with the tiny tokenizers of the test fixtures
(all their ids fit the real vocabularies). Three 512x512 images (256 merged tokens each for
Qwen3-VL) go in target/bench/judge-images/.

Work per comparison, on both sides:
  clip      preprocess first, second, original (shortest edge 224, bicubic, centre crop), one
            get_image_features each, get_text_features of the instruction and of "a photo",
            score = cos(I - Io, T - Tc) + 0.5 cos(I, Io) per edit
  qwen3-vl  preprocess the three images, the prompt of prompts/judge-pairwise.txt, one prefill
            (logits of the last position only), compare the logits of "1" and "2"

Rounds alternate the reference then icedit, each a fresh process (never both at once). Load is
from_pretrained + tokenizer + processor (icedit: building the judge); compare excludes image
decoding. Peak RSS is /usr/bin/time's %M of each child. Ratios are medians of per-round ratios.
"""

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "target" / "bench"
CLIP_DIR, QWEN_DIR, IMAGES = BENCH / "clip-large", BENCH / "qwen3vl-2b", BENCH / "judge-images"
FIXTURES = ROOT / "tests" / "fixtures"
INSTRUCTION, CAPTION, WEIGHT = "make it night", "a photo", 0.5
NAMES = ("first", "second", "original")


def build_clip(out):
    import torch
    from transformers import CLIPConfig, CLIPModel

    if (out / "model.safetensors").exists():
        return
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=768),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu",
                           projection_dim=768),
        projection_dim=768)).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "clip" / "model" / name, tmp / name)
    pre = json.loads((FIXTURES / "clip" / "model" / "preprocessor_config.json").read_text())
    pre.update(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)
    (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    tmp.rename(out)


def build_qwen(out):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if (out / "config.json").exists():
        return
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
            rms_norm_eps=1e-6, max_position_embeddings=262144, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20],
                                 mrope_interleaved=True)),
        vision_config=dict(
            depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
            temporal_patch_size=2, spatial_merge_size=2, in_channels=3, out_hidden_size=2048,
            num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh"),
        image_token_id=405, video_token_id=406, vision_start_token_id=403, vision_end_token_id=404,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(FIXTURES / "qwen3vl" / "model" / name, tmp / name)
    pre = json.loads((FIXTURES / "qwen3vl" / "model" / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": 65536, "longest_edge": 16777216}
    (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    tmp.rename(out)


def make_images(out, size=512):
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    for i, name in enumerate(NAMES):
        rng = np.random.default_rng(i)
        a, b, c = rng.uniform(1, 6, 3)
        pix = np.stack([200 * x + 30, 128 + 90 * np.sin(a * y + b * x), 60 + 150 * x * y * c / 6], -1)
        pix = pix * (0.55 if name == "second" else 0.8 if name == "first" else 1.0)
        pix = np.clip(pix + rng.normal(0, 12, pix.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pix, "RGB").save(out / f"{name}.png")
    return [out / f"{n}.png" for n in NAMES]


def worker(judge):
    """Child process: load, then one comparison, as the reference would do it; JSON on stdout."""
    import torch
    from PIL import Image

    images = [Image.open(IMAGES / f"{n}.png").convert("RGB") for n in NAMES]
    result = {"threads": torch.get_num_threads()}
    if judge == "clip":
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        t = time.perf_counter()
        model = CLIPModel.from_pretrained(CLIP_DIR, dtype=torch.float32).eval()
        tok, proc = AutoTokenizer.from_pretrained(CLIP_DIR), CLIPImageProcessorPil.from_pretrained(CLIP_DIR)
        result["load_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            unit = lambda e: (e / e.norm()).double()[0]
            feats = lambda out: out.pooler_output if hasattr(out, "pooler_output") else out
            img = [unit(feats(model.get_image_features(pixel_values=proc(images=im, return_tensors="pt")
                                                      ["pixel_values"]))) for im in images]
            txt = [unit(feats(model.get_text_features(**tok(s, return_tensors="pt", truncation=True))))
                   for s in (INSTRUCTION, CAPTION)]
            cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
            scores = [cos(e - img[2], txt[0] - txt[1]) + WEIGHT * cos(e, img[2]) for e in img[:2]]
        result["compare_seconds"] = time.perf_counter() - t
        result.update(better=2 if scores[1] > scores[0] else 1, scores=scores, attn=model.config._attn_implementation)
    else:
        from unittest import mock
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration
        from transformers import Qwen3VLProcessor
        from transformers.processing_utils import ProcessorMixin

        t = time.perf_counter()
        model = Qwen3VLForConditionalGeneration.from_pretrained(QWEN_DIR, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(QWEN_DIR)
        check = ProcessorMixin.check_argument_for_proper_class  # no torchvision: no video processor
        lenient = lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg)
        with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
            proc = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(QWEN_DIR),
                                    tokenizer=tok, video_processor=None)
        result["load_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        prompt = (ROOT / "prompts" / "judge-pairwise.txt").read_text().replace("{instruction}", INSTRUCTION)
        text = ("<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 3 + prompt
                + "<|im_end|>\n<|im_start|>assistant\n")
        inputs = proc(text=[text], images=images, return_tensors="pt")  # expands each <|image_pad|>
        with torch.inference_mode():
            logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[0, -1]
        ids = tok.convert_tokens_to_ids(["1", "2"])
        one, two = logits[ids].tolist()
        result["compare_seconds"] = time.perf_counter() - t
        result.update(better=2 if two > one else 1, logits_12=[one, two], tokens=inputs["input_ids"].shape[1],
                      grid=inputs["image_grid_thw"].tolist(), attn=model.config._attn_implementation)
    print(json.dumps(result))


def run_child(cmd):
    """(wall s, peak RSS MiB, parsed JSON stdout) of one fresh process. RSS via /usr/bin/time: the
    child's own ru_maxrss from os.wait4 would include this process's RSS at (v)fork + exec."""
    rss_file = BENCH / "judge-rss.txt"
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + cmd, stdout=subprocess.PIPE,
                         text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}")
    return wall, int(rss_file.read_text().split()[-1]) / 1024, json.loads(res.stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--judges", default="clip,qwen3-vl")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", choices=["clip", "qwen3-vl"], help=argparse.SUPPRESS)
    p.add_argument("--build", choices=["clip", "qwen3-vl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker)
    if a.build:  # in a child, so that this process stays small
        return build_clip(CLIP_DIR) if a.build == "clip" else build_qwen(QWEN_DIR)

    judges = a.judges.split(",")
    first, second, original = make_images(IMAGES)
    for judge in judges:
        subprocess.run([sys.executable, __file__, "--build", judge], check=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "icedit-cli"], cwd=ROOT, check=True)
    icedit = ROOT / "target" / "release" / "icedit"
    tables = []
    for judge in judges:
        folder = CLIP_DIR if judge == "clip" else QWEN_DIR
        py_cmd = [sys.executable, __file__, "--worker", judge]
        rs_cmd = [str(icedit), "judge", "--judge", f"{judge}:{folder}", "--instruction", INSTRUCTION,
                  "--original", str(original), str(first), str(second), "--json", "--dtype", "f32",
                  "--device", "cpu"]
        runs = {"python": [], "icedit": []}
        for r in range(a.rounds):
            for side, cmd in (("python", py_cmd), ("icedit", rs_cmd)):
                wall, rss, out = run_child(cmd)
                runs[side].append(dict(out, wall=wall, rss=rss))
                print(f"{judge} round {r + 1} {side:7s}: load {out['load_seconds']:.2f}s, compare "
                      f"{out['compare_seconds']:.2f}s, process {wall:.2f}s, peak RSS {rss:.0f} MiB, "
                      f"better {out['better']}", flush=True)
        py, rs = runs["python"][-1], runs["icedit"][-1]
        med = lambda side, k: statistics.median(x[k] for x in runs[side])
        ratio = lambda k: statistics.median(b[k] / a_[k] for a_, b in zip(runs["python"], runs["icedit"]))
        verdicts = {s: sorted({x["better"] for x in runs[s]}) for s in runs}
        lines = [f"### {judge} ({a.rounds} rounds, CPU f32, torch threads {py['threads']}, "
                 f"torch attention {py['attn']})", "",
                 "| side | load s | compare s | process s | peak RSS MiB | better |",
                 "|---|---:|---:|---:|---:|---|"]
        for side in ("python", "icedit"):
            lines.append(f"| {side} | {med(side, 'load_seconds'):.2f} | {med(side, 'compare_seconds'):.2f} | "
                         f"{med(side, 'wall'):.2f} | {med(side, 'rss'):.0f} | {verdicts[side]} |")
        lines.append(f"| icedit/python | {ratio('load_seconds'):.2f}x | {ratio('compare_seconds'):.2f}x | "
                     f"{ratio('wall'):.2f}x | {med('icedit', 'rss') / med('python', 'rss'):.2f}x | "
                     f"{'agree' if verdicts['python'] == verdicts['icedit'] else 'DISAGREE'} |")
        if judge == "clip":
            lines.append(f"\npython scores (image 1, image 2): {py['scores']}\nicedit: {rs['answer']}")
        else:
            p1 = 1 / (1 + math.exp(py["logits_12"][1] - py["logits_12"][0]))
            lines.append(f"\npython logits ('1', '2'): {py['logits_12']}, P(1) = {p1:.3f}, P(2) = {1 - p1:.3f} "
                         f"({py['tokens']} tokens, grids "
                         f"{py['grid']})\nicedit: {rs['answer']}")
        tables.append("\n".join(lines))
    print("\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
