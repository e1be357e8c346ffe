"""A tiny random CLIP and the embeddings / judge scores the Rust CLIP judge must reproduce.

Run: .venv-ref/bin/python tests/reference/gen_clip_judge.py (from the repo root)

Writes tests/fixtures/clip/ (deleted and recreated on each run):
  model/               transformers CLIPModel (f32, random, hidden 32, 2 layers, 32x32 images,
                       patch 8, projection 16) laid out like a Hub repo: config.json,
                       model.safetensors, tokenizer.json (+ tokenizer_config.json),
                       preprocessor_config.json (CLIPImageProcessorPil, shortest edge 32, crop 32)
  images/              source.png 48x40, first.png 40x52, second.png 57x45 (w x h): one scene,
                       first slightly changed, second more (darker, shapes moved)
  texts.json           the test texts, in order
  expected.safetensors pixel_values.{image} (1,3,32,32), image_embeds.{image} (1,16),
                       text_ids.{k} (i64, (1,L)), text_embeds.{k} (1,16); embeds are projected and
                       NOT normalised
  scores.json          judge scores for first / second: direction = cos(Ic - Is, Ti - Tc),
                       similarity = cos(Ic, Is), score = direction + weight * similarity, on
                       L2-normalised embeddings, in float64

The tokenizer is a tiny CLIP BPE built locally: 256 byte-level characters, the same with
"</w>", the merges below, then <|startoftext|> and <|endoftext|> last (the largest id, as in
the real vocab), so that the text model's legacy eos_token_id == 2 branch (pool at
argmax(input_ids)) pools at <|endoftext|>, as candle-transformers' CLIP does.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel,
                          CLIPTokenizer)

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "clip"
MODEL = OUT / "model"
LONG = " ".join(["make the photo of the red scarf look like a night sky"] * 11)  # 121 words
TEXTS = ["a photo", "make it night", "give him a red scarf", "Make The Photo  look like NIGHT!", LONG]
CAPTION, INSTRUCTION, WEIGHT = 0, 1, 0.5
IMAGES = {"source": (48, 40, 0.0), "first": (40, 52, 0.25), "second": (57, 45, 1.0)}  # w, h, change
MERGES = [  # applied in this order (rank); each result is a vocab entry
    ("t", "h"), ("th", "e</w>"), ("p", "h"), ("t", "o</w>"), ("ph", "o"), ("pho", "to</w>"),
    ("n", "i"), ("g", "h"), ("gh", "t</w>"), ("ni", "ght</w>"), ("i", "t</w>"), ("m", "a"),
    ("k", "e</w>"), ("ma", "ke</w>"), ("r", "e"), ("re", "d</w>"), ("l", "o"), ("o", "k</w>"),
    ("lo", "ok</w>"), ("l", "i"), ("li", "ke</w>"), ("g", "i"), ("v", "e</w>"), ("gi", "ve</w>"),
    ("h", "i"), ("hi", "m</w>"), ("s", "c"), ("a", "r"), ("sc", "ar"), ("scar", "f</w>"),
    ("o", "f</w>"), ("s", "k"), ("sk", "y</w>"), ("i", "n"), ("in", "g</w>"),
]


def byte_chars():
    """CLIP's / GPT-2's bytes_to_unicode, in its order: printable bytes map to themselves."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(extra))]


def build_tokenizer():
    chars = byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab)
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=list(MERGES), model_max_length=77)
    assert tok.eos_token_id == len(vocab) - 1 and tok.bos_token_id == len(vocab) - 2
    return tok


def make_image(w, h, change, seed):
    """One scene sampled on [0,1]^2 at w x h; `change` darkens it and moves the shapes."""
    y, x = np.mgrid[0:h, 0:w]
    u, v = (x + 0.5) / w, (y + 0.5) / h
    img = np.zeros((h, w, 3))
    img[..., 0] = 200 * u + 30
    img[..., 1] = 120 + 80 * np.sin(3 * v + 1.5 * change)
    img[..., 2] = 90 + 120 * v * u
    img *= 1.0 - 0.5 * change  # "night"
    disc = (u - 0.35 - 0.2 * change) ** 2 + (v - 0.45) ** 2 < 0.04
    img[disc] = [240, 220 - 100 * change, 40 + 60 * change]
    box = (np.abs(u - 0.72) < 0.12) & (np.abs(v - 0.7 + 0.15 * change) < 0.15)
    img[box] = [30 + 150 * change, 60, 200]
    img += np.random.default_rng(seed).normal(0, 6, img.shape)
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def random_model(vocab_size):
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=16)
    text = dict(common, vocab_size=vocab_size, max_position_embeddings=77,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)  # the legacy openai values
    vision = dict(common, image_size=32, patch_size=8)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # LayerNorms are ones/zeros and biases zeros after init: perturb all
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model


def reference_pixels(img, mean, std):
    """The PIL backend's steps, spelled out: resize, crop (uint8), rescale (f64 -> f32), normalise (f32)."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(32 * long / short)  # truncation, like torchvision
    rw, rh = (32, new_long) if w <= h else (new_long, 32)
    arr = np.asarray(img.resize((rw, rh), Image.Resampling.BICUBIC)).transpose(2, 0, 1)  # uint8 CHW
    top, left = (rh - 32) // 2, (rw - 32) // 2
    arr = arr[:, top:top + 32, left:left + 32]
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    m, s = np.array(mean, np.float32), np.array(std, np.float32)
    x = ((x.T - m) / s).T
    return x[None], (rw, rh), (top, left)


def check_reload(tensors):
    """The saved folder alone (default sdpa attention) gives the same ids, pixels and embeddings."""
    model = CLIPModel.from_pretrained(MODEL).eval()
    tok, proc = AutoTokenizer.from_pretrained(MODEL), AutoImageProcessor.from_pretrained(MODEL)
    diff = 0.0
    with torch.no_grad():
        for name in IMAGES:
            pv = proc(images=Image.open(OUT / "images" / f"{name}.png").convert("RGB"), return_tensors="pt")
            assert torch.equal(pv["pixel_values"], tensors[f"pixel_values.{name}"])
            e = model.get_image_features(pixel_values=pv["pixel_values"]).pooler_output
            diff = max(diff, (e - tensors[f"image_embeds.{name}"]).abs().max().item())
        for k, text in enumerate(TEXTS):
            ids = tok(text, truncation=True, max_length=77, return_tensors="pt")["input_ids"]
            assert torch.equal(ids, tensors[f"text_ids.{k}"])
            e = model.get_text_features(input_ids=ids).pooler_output
            diff = max(diff, (e - tensors[f"text_embeds.{k}"]).abs().max().item())
    print(f"reloaded {type(tok).__name__} / {type(proc).__name__} / CLIPModel "
          f"({model.config.text_config._attn_implementation}): max|embeds - eager embeds| = {diff:.3g}")
    assert diff < 1e-5


def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main():
    torch.set_num_threads(1)
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "images").mkdir(parents=True)
    tok = build_tokenizer()
    model = random_model(len(tok))
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(MODEL, safe_serialization=True)
    tok.save_pretrained(MODEL)  # before any call with truncation, so tokenizer.json carries none
    proc.save_pretrained(MODEL)
    (OUT / "texts.json").write_text(json.dumps(TEXTS, indent=1))

    tensors, emb = {}, {}
    with torch.no_grad():
        for i, (name, (w, h, change)) in enumerate(IMAGES.items()):
            make_image(w, h, change, seed=10 + i).save(OUT / "images" / f"{name}.png")
            img = Image.open(OUT / "images" / f"{name}.png").convert("RGB")
            pv = proc(images=img, return_tensors="pt")["pixel_values"]
            ref, resized, offsets = reference_pixels(img, proc.image_mean, proc.image_std)
            assert pv.dtype == torch.float32 and np.array_equal(pv.numpy(), ref), name
            print(f"image {name}: {w}x{h} -> resized {resized[0]}x{resized[1]}, crop top/left {offsets}")
            e = model.visual_projection(model.vision_model(pixel_values=pv).pooler_output)
            feats = model.get_image_features(pixel_values=pv)
            feats = feats if torch.is_tensor(feats) else feats.pooler_output
            print(f"  max|explicit - get_image_features| = {(e - feats).abs().max().item():.3g}")
            assert torch.equal(e, feats)
            tensors[f"pixel_values.{name}"], tensors[f"image_embeds.{name}"] = pv, e
            emb[name] = e[0].double().numpy()

        fast = tokenizers.Tokenizer.from_file(str(MODEL / "tokenizer.json"))
        for k, text in enumerate(TEXTS):
            ids = tok(text, truncation=True, max_length=77, return_tensors="pt")["input_ids"]
            raw = fast.encode(text).ids
            if len(raw) > 77:  # tokenizer.json has no truncation; the caller truncates to 77
                assert k == len(TEXTS) - 1 and ids.shape[1] == 77 and ids[0, -1] == tok.eos_token_id
                fast.enable_truncation(77)
                raw = fast.encode(text).ids
                fast.no_truncation()
            assert raw == ids[0].tolist(), (text, raw, ids)
            assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
            out = model.text_model(input_ids=ids)
            eos = ids.shape[1] - 1
            assert ids[0].argmax() == eos and torch.equal(out.pooler_output[0], out.last_hidden_state[0, eos])
            e = model.text_projection(out.pooler_output)
            feats = model.get_text_features(input_ids=ids)
            feats = feats if torch.is_tensor(feats) else feats.pooler_output
            assert torch.equal(e, feats)
            print(f"text {k} ({ids.shape[1]} ids, pooled at argmax = eos {eos}; "
                  f"max|explicit - get_text_features| = {(e - feats).abs().max().item():.3g}): "
                  f"{ids[0, :20].tolist()}")
            tensors[f"text_ids.{k}"], tensors[f"text_embeds.{k}"] = ids.to(torch.int64), e
            emb[k] = e[0].double().numpy()
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "expected.safetensors")
    check_reload(tensors)

    n = {k: v / np.linalg.norm(v) for k, v in emb.items()}
    scores = dict(caption=TEXTS[CAPTION], instruction=TEXTS[INSTRUCTION], weight=WEIGHT)
    for c in ("first", "second"):
        d = cos(n[c] - n["source"], n[INSTRUCTION] - n[CAPTION])
        s = cos(n[c], n["source"])
        scores[c] = dict(direction=d, similarity=s, score=d + WEIGHT * s)
    (OUT / "scores.json").write_text(json.dumps(scores, indent=1))
    print(json.dumps(scores))
    print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
