"""Fixtures for (A) the T5 text encoder loaded from a GGUF file (llama.cpp / city96 layout) and
(B) FLUX.1 Fill transformers stored as float8 e4m3fn safetensors (ComfyUI plain and "scaled fp8").

tests/fixtures/t5_gguf/
  t5_q8_0.gguf          the tiny pipeline's T5 encoder (tests/fixtures/fill_pipeline/tiny/text_encoder_2)
                        as llama.cpp writes a T5 encoder: arch "t5encoder", llama.cpp tensor names,
                        2-D weights with rows a multiple of 32 Q8_0, ffn_down (48 wide) and the
                        relative attention bias F16, 1-D norms F32
  t5_f16.gguf           the same, every 2-D tensor F16, 1-D F32
  encoded.safetensors   input_ids (int64 [1, 512]) of the ICEdit prompt, hidden.q8_0 / hidden.f16
                        (T5EncoderModel.from_pretrained(..., gguf_file=...) outputs, f32 [1, 512, 32]),
                        hidden.f32 (the original safetensors T5, for comparison)
  source.png, diptych.png, mask.png   copies of tests/fixtures/edit's inputs
  runs/t5_q8_0_bare/    FluxFillPipeline(tiny, text_encoder_2 = the Q8_0 GGUF T5) edit run, as
                        gen_edit_adapters.py's `bare`: edit.png, diptych_out.png, image.safetensors
  runs.json             run parameters (tests/fixtures/edit/runs.json's format) + versions
  fixtures.json         metadata, tensor names/types, the config transformers derived, checks
  README.md

tests/fixtures/fp8/
  flux_fp8_e4m3fn.safetensors  tests/fixtures/gguf's tiny FLUX.1 Fill transformer in BFL names, with
                               prefix `model.diffusion_model.`: block/final-layer matrices
                               float8_e4m3fn (plain cast), the rest bf16
  flux_fp8_scaled.safetensors  no prefix, ComfyUI "scaled fp8": marker `scaled_fp8`
                               (float8_e4m3fn, 0 elements), matrices (w / s) -> float8_e4m3fn with
                               `<module>.scale_weight` = s = max|w| / 448 (f32, 0-dim), rest bf16
  forward.safetensors          tests/fixtures/gguf/forward.safetensors's inputs, out.f32 (unquantized),
                               out.fp8, out.fp8_scaled (weights upcast as w.to(f32) * scale_weight)
  fixtures.json                layouts, tensor dtypes, forward sanity figures, versions
  README.md

Helpers (BFL conversion, diffusers' patched BFL converter, the tiny transformer, the forward call,
edit inputs and pipeline call) are imported from gen_gguf.py / gen_edit_adapters.py.

Run (from the repo root, in the reference venv; deterministic, CPU, f32, 1 thread; byte-identical
reruns):
  .venv-ref/bin/python tests/reference/gen_t5_gguf_fp8.py
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import gguf  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import FluxFillPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, GGUFWriter  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_edit_adapters as edit  # noqa: E402
import gen_gguf as gg  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "fill_pipeline" / "tiny"
EDIT = ROOT / "tests" / "fixtures" / "edit"
GGUF_DIR = ROOT / "tests" / "fixtures" / "gguf"
T5_OUT = ROOT / "tests" / "fixtures" / "t5_gguf"
FP8_OUT = ROOT / "tests" / "fixtures" / "fp8"

T5_ARCH = "t5encoder"  # llama.cpp's convert_hf_to_gguf.py T5EncoderModel (city96's files)
T5_NAME = "tiny-t5-encoder"  # general.name; transformers reads it only to tell umt5 from t5
T5_FILES = {"t5_q8_0.gguf": ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0),
            "t5_f16.gguf": ("f16", gguf.LlamaFileType.MOSTLY_F16)}
N_CTX = 512  # llama.cpp's default when config.json has no n_positions (T5 v1.1 has none)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PREFIX = "model.diffusion_model."
FP8_FILES = {"flux_fp8_e4m3fn.safetensors": ("fp8", PREFIX), "flux_fp8_scaled.safetensors": ("fp8_scaled", "")}
EMBEDDERS = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")

log = edit.log


def versions():
    return {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "gguf": gg.gguf_version(), "safetensors": safetensors.__version__, "numpy": np.__version__,
    }


def jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return str(v)
    return v


# =============================================================================================
# A. T5 encoder as GGUF


def t5_name_map(num_layers):
    """gguf-py's own HF -> GGUF tensor name map for arch t5encoder (what llama.cpp's converter uses)."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, num_layers)


def t5_to_gguf_tensors(model):
    """HF T5EncoderModel state dict -> [(gguf name, float32 numpy in torch order, hf name)], in the
    model's order, as convert_hf_to_gguf.py writes them (the shared embedding once, as token_embd)."""
    nm = t5_name_map(model.config.num_layers)
    out = []
    shared_done = False
    for hf, t in model.state_dict().items():
        if hf in ("shared.weight", "encoder.embed_tokens.weight"):
            if shared_done:
                assert torch.equal(t, model.shared.weight)
                continue
            shared_done = True
            hf = "shared.weight"
        base, suffix = hf.rsplit(".", 1)
        name = nm.get_name(base)
        assert name is not None, hf
        out.append((f"{name}.{suffix}", t.detach().float().numpy().copy(), hf))
    return out


def t5_type(name, arr, kind):
    if arr.ndim == 1:
        return Q.F32
    if kind == "f16":
        return Q.F16
    # llama-quantize keeps attn_rel_b unquantized (at the converter's F16); a row that Q8_0 cannot
    # block (ffn_down: 48 wide) stays at the converter's F16 too.
    if "attn_rel_b" in name or arr.shape[-1] % 32:
        return Q.F16
    return Q.Q8_0


def add_t5_tokenizer(writer):
    """tokenizer.ggml.* as convert_hf_to_gguf.py's T5EncoderModel.set_vocab writes them, from the
    tiny tokenizer_2/tokenizer.json (a Unigram with no sentencepiece model: no precompiled_charsmap)."""
    tj = json.loads((TINY / "tokenizer_2" / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "Unigram"
    vocab = tj["model"]["vocab"]
    special = {t["id"]: t["content"] for t in tj["added_tokens"] if t["special"]}
    unk = tj["model"]["unk_id"]
    tokens, scores, types = [], [], []
    for i, (piece, score) in enumerate(vocab):
        tokens.append(piece.encode("utf-8"))
        scores.append(float(score))
        if i == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in special:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(True)
    sv = gguf.SpecialVocab(TINY / "tokenizer_2", n_vocab=len(tokens))
    sv.add_to_gguf(writer, quiet=True)
    return {"n_tokens": len(tokens), "special_ids": dict(sorted(sv.special_token_ids.items())),
            "add_special": dict(sorted(sv.add_special_token.items()))}


def write_t5_gguf(path, tensors, kind, ftype, cfg):
    writer = GGUFWriter(str(path), T5_ARCH)
    writer.add_name(T5_NAME)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_key_length(cfg.d_kv)
    writer.add_value_length(cfg.d_kv)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = add_t5_tokenizer(writer)
    types = {}
    for name, arr, _ in tensors:
        qt = t5_type(name, arr, kind)
        a, raw_dtype = gg.quantize(arr, qt) if arr.ndim == 2 else (arr.astype(np.float32), None)
        writer.add_tensor(name, a, raw_dtype=raw_dtype)
        types[name] = qt
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types, tok


def gguf_fields(path):
    reader = GGUFReader(str(path))
    md = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            v = f"<array of {len(v)}>"
        md[k] = jsonable(v)
    tensors = {}
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        tensors[t.name] = {"type": t.tensor_type.name, "gguf_dims": [int(x) for x in t.shape], "torch_shape": shape,
                           "deq": gg.dequant_np(np.array(t.data), t.tensor_type).reshape(shape)}
    return md, tensors


def gguf_t5_config(file):
    """The config transformers derives from the file's metadata, plus feed_forward_proj "gated-gelu".

    transformers' legacy GGUF reader sets `is_gated_act = True` for t5/t5encoder but never
    `feed_forward_proj`, so T5Config keeps its default "relu" and `dense_act_fn` = "relu": the stock
    `from_pretrained(gguf_file=...)` builds a gated-*ReLU* T5 (wrong for T5 v1.1 / FLUX's T5-XXL,
    which is gated-gelu = gelu_new, as llama.cpp computes it). Rebuilding the config from the same
    derived dict with feed_forward_proj "gated-gelu" fixes only that."""
    derived = load_gguf_checkpoint(str(T5_OUT / file), return_tensors=False)["config"]
    d = {k: v for k, v in derived.items() if k != "model_type"}
    return T5Config(**d, feed_forward_proj="gated-gelu")


def load_t5_gguf(file, stock=False):
    kw = {} if stock else {"config": gguf_t5_config(file)}
    return T5EncoderModel.from_pretrained(str(T5_OUT), gguf_file=file, torch_dtype=torch.float32, **kw).eval()


def make_t5(meta):
    T5_OUT.mkdir(parents=True)
    ref = T5EncoderModel.from_pretrained(TINY / "text_encoder_2", torch_dtype=torch.float32).eval()
    cfg = ref.config
    tensors = t5_to_gguf_tensors(ref)
    tok = T5TokenizerFast.from_pretrained(TINY / "tokenizer_2")
    enc = tok(edit.PROMPT, padding="max_length", max_length=edit.MAX_SEQ, truncation=True, return_length=False,
              return_overflowing_tokens=False, return_tensors="pt")
    ids = enc.input_ids
    assert ids.dtype == torch.int64 and ids.shape == (1, edit.MAX_SEQ)
    with torch.no_grad():
        hidden_f32 = ref(ids, output_hidden_states=False)[0]
    encoded = {"input_ids": ids.contiguous(), "hidden.f32": hidden_f32.contiguous()}

    files = {}
    models = {}
    for file, (kind, ftype) in T5_FILES.items():
        types, tok_info = write_t5_gguf(T5_OUT / file, tensors, kind, ftype, cfg)
        md, gt = gguf_fields(T5_OUT / file)
        assert {n: Q[v["type"]] for n, v in gt.items()} == types

        # what transformers derives from the metadata alone (legacy reader: t5encoder has no fast path)
        derived = load_gguf_checkpoint(str(T5_OUT / file), return_tensors=False)
        stock = load_t5_gguf(file, stock=True)
        stock_cfg = jsonable({k: getattr(stock.config, k) for k in ("feed_forward_proj", "is_gated_act", "dense_act_fn")})
        assert stock_cfg == {"feed_forward_proj": "relu", "is_gated_act": True, "dense_act_fn": "relu"}, stock_cfg
        with torch.no_grad():
            hidden_stock = stock(ids, output_hidden_states=False)[0]
        model = load_t5_gguf(file)
        mcfg = model.config
        assert all(torch.equal(a, b) for a, b in zip(stock.state_dict().values(), model.state_dict().values()))
        # the loaded model must be the tiny T5 (gated-gelu, same sizes)
        for k in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "vocab_size", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "is_gated_act", "dense_act_fn"):
            assert getattr(mcfg, k) == getattr(cfg, k), (file, k, getattr(mcfg, k), getattr(cfg, k))
        # GGUF stores the epsilon as float32: transformers gets 1e-6 rounded to f32 (9.99999997e-07)
        assert mcfg.layer_norm_epsilon == float(np.float32(cfg.layer_norm_epsilon)), mcfg.layer_norm_epsilon
        # the weights transformers ends up with == gguf-py numpy dequantization of the file, exactly
        sd = model.state_dict()
        by_hf = {hf: name for name, _, hf in tensors}
        for hf, v in sd.items():
            gname = by_hf["shared.weight" if hf == "encoder.embed_tokens.weight" else hf]
            want = torch.from_numpy(np.ascontiguousarray(gt[gname]["deq"], np.float32))
            assert v.dtype == torch.float32 and torch.equal(v, want), (file, hf)
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=False)[0]
        # the pipeline's own T5 path gives the same
        pipe = FluxFillPipeline.from_pretrained(TINY, text_encoder_2=model, torch_dtype=torch.float32)
        with torch.no_grad():
            via_pipe = pipe._get_t5_prompt_embeds(edit.PROMPT, 1, edit.MAX_SEQ)
        assert torch.equal(via_pipe, hidden), file
        del pipe
        diff = float((hidden - hidden_f32).abs().max())
        assert 0 < diff < 0.5 * float(hidden_f32.abs().max()), (file, diff)
        encoded[f"hidden.{kind}"] = hidden.contiguous()
        models[kind] = model
        files[file] = {
            "metadata": md,
            "tokenizer": tok_info,
            "tensors": {n: {k: v[k] for k in ("type", "gguf_dims", "torch_shape")} for n, v in gt.items()},
            "hf_names": {name: hf for name, _, hf in tensors},
            "transformers_derived_config": jsonable({k: v for k, v in derived["config"].items()}),
            "transformers_loaded_config": jsonable({k: getattr(mcfg, k) for k in (
                "model_type", "architectures", "d_model", "d_ff", "d_kv", "num_heads", "num_layers",
                "num_decoder_layers", "vocab_size", "relative_attention_num_buckets",
                "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj", "is_gated_act",
                "dense_act_fn", "tie_word_embeddings", "pad_token_id", "eos_token_id")}),
            "stock_transformers_config": stock_cfg,
            "stock_gated_relu_hidden_max_abs_diff_vs_reference": float((hidden_stock - hidden).abs().max()),
            "hidden_max_abs_diff_vs_f32": diff,
            "hidden_mean_abs_diff_vs_f32": float((hidden - hidden_f32).abs().mean()),
            "max_weight_abs_err_vs_f32": max(float(np.abs(gt[n]["deq"] - a).max()) for n, a, _ in tensors),
        }
        log(f"{file}: hidden max |d| vs f32 {diff:.4g}")
    save_file(encoded, T5_OUT / "encoded.safetensors")
    assert load_file(T5_OUT / "encoded.safetensors")["input_ids"].dtype == torch.int64
    meta["t5"] = {
        "files": files,
        "prompt": edit.PROMPT,
        "n_prompt_tokens_with_eos": int((ids != tok.pad_token_id).sum()),
        "hidden_f32_max_abs": float(hidden_f32.abs().max()),
        "tiny_config": jsonable({k: getattr(cfg, k) for k in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers",
                                                               "vocab_size", "feed_forward_proj", "dense_act_fn")}),
    }

    # --- whole pipeline run with the Q8_0 T5 ---------------------------------------------------
    src = Image.open(EDIT / "source.png").convert("RGB")
    assert np.array_equal(np.asarray(src), np.asarray(edit.source_image()))
    dip, mask = edit.diptych(src)
    assert np.array_equal(np.asarray(dip), np.asarray(Image.open(EDIT / "diptych.png")))
    assert np.array_equal(np.asarray(mask), np.asarray(Image.open(EDIT / "mask.png")))
    for f in ("source.png", "diptych.png", "mask.png"):
        shutil.copy(EDIT / f, T5_OUT / f)
    name, seed = "t5_q8_0_bare", 42
    folder = T5_OUT / "runs" / name
    folder.mkdir(parents=True)
    pipe = FluxFillPipeline.from_pretrained(TINY, text_encoder_2=load_t5_gguf("t5_q8_0.gguf"),
                                            torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    H, W = edit.SRC_H, 2 * edit.SRC_W
    img = edit.pipeline_call(pipe, dip, mask, seed, "pt")
    assert img.shape == (1, 3, H, W)
    pil = edit.pipeline_call(pipe, dip, mask, seed, "pil")[0]
    check = pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(img))[0]
    assert np.array_equal(np.asarray(pil), np.asarray(check)), "pil and pt runs differ"
    pil.save(folder / "diptych_out.png")
    pil.crop((edit.SRC_W, 0, W, H)).save(folder / "edit.png")
    save_file({"image": img.float().contiguous()}, folder / "image.safetensors")
    bare = load_file(EDIT / "runs" / "bare" / "image.safetensors")["image"]
    entry = {
        "name": name, "text_encoder_2": "t5_q8_0.gguf", "adapter_file": None, "adapter_kind": "none",
        "lora_scale": None, "adapter_weight": None, "top_k": None, "seed": seed, "steps": edit.STEPS,
        "guidance": edit.GUIDANCE, "max_sequence_length": edit.MAX_SEQ, "width": W, "height": H,
        "prompt": edit.PROMPT,
        "saturated_fraction": float(((img <= 0) | (img >= 1)).float().mean()),
        "max_abs_diff_vs_edit_bare": float((img - bare).abs().max()),
        "mean_abs_diff_vs_edit_bare": float((img - bare).abs().mean()),
    }
    assert float(img.max() - img.min()) > 0.1
    assert entry["max_abs_diff_vs_edit_bare"] > 0, "GGUF T5 run equals the f32 T5 run"
    (T5_OUT / "runs.json").write_text(json.dumps({
        "versions": versions(),
        "prompt": edit.PROMPT,
        "inputs": {"source": "source.png", "diptych": "diptych.png", "mask": "mask.png"},
        "pipeline": "FluxFillPipeline.from_pretrained(tests/fixtures/fill_pipeline/tiny, text_encoder_2="
        "T5EncoderModel.from_pretrained(tests/fixtures/t5_gguf, gguf_file='t5_q8_0.gguf', torch_dtype=float32), "
        "torch_dtype=float32)",
        "compare_to": "tests/fixtures/edit/runs/bare/image.safetensors (same run, safetensors f32 T5)",
        "runs": [entry],
    }, indent=1))
    meta["t5"]["run"] = entry
    log(f"{name}: max |d| vs edit bare {entry['max_abs_diff_vs_edit_bare']:.4g}")
    return meta


# =============================================================================================
# B. FP8 transformers


def is_fp8_weight(name, t):
    return t.ndim == 2 and name.endswith(".weight") and name.startswith(("double_blocks.", "single_blocks.", "final_layer."))


def make_fp8_sd(bfl, kind, prefix):
    out = {}
    scales = {}
    if kind == "fp8_scaled":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    for name in sorted(bfl):
        w = bfl[name].float()
        if is_fp8_weight(name, w):
            if kind == "fp8":
                q = w.to(FP8)
            else:
                s = (w.abs().max() / FP8_MAX).to(torch.float32)
                q = (w / s).to(FP8)
                module = name.removesuffix(".weight")
                out[prefix + module + ".scale_weight"] = s.reshape(()).clone()
                scales[module] = float(s)
            assert torch.isfinite(q.float()).all(), name
            out[prefix + name] = q.contiguous()
        else:
            out[prefix + name] = w.to(torch.bfloat16).contiguous()
    return out, scales


def upcast(sd, prefix):
    """What a loader computes: w = fp8.to(float32) * scale_weight (1 when absent); bf16 -> float32."""
    bfl = {}
    for k, v in sd.items():
        if k.endswith(".scale_weight") or k.endswith("scaled_fp8"):
            continue
        name = k[len(prefix):]
        scale_key = k.removesuffix(".weight") + ".scale_weight"
        w = v.to(torch.float32)
        if scale_key in sd:
            w = w * sd[scale_key].to(torch.float32)
        bfl[name] = w.contiguous()
    return bfl


def make_fp8(meta):
    FP8_OUT.mkdir(parents=True)
    model = gg.build_model()
    cfg = dict(model.config)
    saved_cfg = json.loads((GGUF_DIR / "transformer" / "config.json").read_text())
    assert all(cfg[k] == v for k, v in saved_cfg.items() if not k.startswith("_")), "config differs from gguf's"
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bfl = gg.to_bfl(sd, cfg)

    gfx = load_file(GGUF_DIR / "forward.safetensors")
    fx = gg.forward_inputs()
    for k, v in fx.items():
        assert torch.equal(gfx[k], v), k
    out_f32 = gg.forward(model, fx)
    assert torch.equal(out_f32, gfx["out.f32"]), "unquantized forward differs from tests/fixtures/gguf"
    fwd = {k: v.contiguous() for k, v in fx.items()}
    fwd["out.f32"] = out_f32.contiguous()

    files = {}
    checks = {}
    for file, (kind, prefix) in FP8_FILES.items():
        fsd, scales = make_fp8_sd(bfl, kind, prefix)
        save_file(fsd, FP8_OUT / file)
        back = load_file(FP8_OUT / file)
        assert set(back) == set(fsd) and all(
            back[k].dtype == fsd[k].dtype and back[k].shape == fsd[k].shape
            and torch.equal(back[k].view(torch.uint8) if back[k].dtype == FP8 else back[k],
                            fsd[k].view(torch.uint8) if fsd[k].dtype == FP8 else fsd[k]) for k in fsd)
        up = upcast(back, prefix)
        assert set(up) == set(bfl)
        dsd = gg.PATCHED_CONVERTER(checkpoint=dict(up), config=cfg)
        qmodel = FluxTransformer2DModel(**gg.CONFIG).eval()
        qmodel.load_state_dict(dsd)
        out = gg.forward(qmodel, fx)
        diff = float((out - out_f32).abs().max())
        assert 0 < diff < 0.5 * float(out_f32.abs().max()), (kind, diff)
        fwd[f"out.{kind}"] = out.contiguous()
        rel = {}
        for n, t in bfl.items():
            e = float((up[n] - t).abs().max() / max(float(t.abs().max()), 1e-12))
            key = "fp8" if is_fp8_weight(n, t) else "bf16"
            rel[key] = max(rel.get(key, 0.0), e)
        checks[kind] = {"max_abs_diff_vs_f32": diff, "mean_abs_diff_vs_f32": float((out - out_f32).abs().mean()),
                        "max_rel_weight_error": rel}
        with safe_open(str(FP8_OUT / file), "pt") as f:
            file_md = f.metadata()
        files[file] = {
            "kind": kind, "prefix": prefix, "safetensors_metadata": file_md,
            "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in sorted(back.items())},
            "scale_weight": dict(sorted(scales.items())) if scales else None,
        }
        log(f"{file}: forward max |d| vs f32 {diff:.4g}")
        del qmodel
    # the two quantizations differ
    checks["fp8_vs_fp8_scaled_max_abs"] = float((fwd["out.fp8"] - fwd["out.fp8_scaled"]).abs().max())
    assert checks["fp8_vs_fp8_scaled_max_abs"] > 0
    save_file(fwd, FP8_OUT / "forward.safetensors")
    meta["fp8"] = {"files": files, "forward": checks, "out_f32_max_abs": float(out_f32.abs().max()),
                   "config": "tests/fixtures/gguf/transformer/config.json"}
    return meta


# =============================================================================================
# READMEs


def t5_readme(meta):
    t5 = meta["t5"]
    q8 = t5["files"]["t5_q8_0.gguf"]
    f16 = t5["files"]["t5_f16.gguf"]
    md_lines = "\n".join(f"  {k} = {json.dumps(v)}" for k, v in q8["metadata"].items())
    tensor_lines = "\n".join(
        f"  {n:<28} {str(v['torch_shape']):<10} gguf dims {str(v['gguf_dims']):<10} q8_0: {v['type']:<5} "
        f"f16: {f16['tensors'][n]['type']:<4} <- {q8['hf_names'][n]}"
        for n, v in q8["tensors"].items())
    derived = json.dumps(q8["transformers_derived_config"], sort_keys=True)
    loaded = json.dumps(q8["transformers_loaded_config"], sort_keys=True)
    run = t5["run"]
    text = f"""# T5 encoder from GGUF (llama.cpp `t5encoder` layout, as city96/t5-v1_1-xxl-encoder-gguf)

Made by `tests/reference/gen_t5_gguf_fp8.py` (part A). Regenerate (deterministic, CPU, f32,
1 thread; byte-identical reruns) from the repo root with

    .venv-ref/bin/python tests/reference/gen_t5_gguf_fp8.py

Versions: `runs.json` / `fixtures.json` (`versions`). The model is the tiny pipeline's T5
(`tests/fixtures/fill_pipeline/tiny/text_encoder_2`: d_model 32, d_ff 48, d_kv 8, 4 heads, 2 layers,
gated-gelu (`gelu_new`), vocab 156, 32 relative buckets, max distance 128).

## Files
- `t5_q8_0.gguf` (general.file_type 7 MOSTLY_Q8_0): 2-D tensors whose row (last torch dim) is a
  multiple of 32 are Q8_0 (`gguf.quants.quantize`); `enc.blk.N.ffn_down.weight` ([32, 48], row 48)
  and `enc.blk.0.attn_rel_b.weight` are F16 (llama-quantize never quantizes `attn_rel_b` and
  keeps it at the converter's F16; ffn_down cannot be Q8_0-blocked and is kept at F16 too); 1-D
  norm weights F32.
- `t5_f16.gguf` (general.file_type 1 MOSTLY_F16): every 2-D tensor F16, 1-D F32.
- `encoded.safetensors`: `input_ids` int64 [1, 512] (safetensors stores I64), the prompt
  `{edit.PROMPT}` tokenized by `tokenizer_2` (T5TokenizerFast) exactly as
  `FluxFillPipeline._get_t5_prompt_embeds` (padding "max_length", max_length 512, truncation;
  {t5['n_prompt_tokens_with_eos']} real tokens incl. `</s>`, then pad 0; no attention mask is passed to the
  encoder); `hidden.q8_0`, `hidden.f16` f32 [1, 512, 32] = `T5EncoderModel.from_pretrained("tests/fixtures/t5_gguf",
  gguf_file=<file>, config=<GGUF-derived config with feed_forward_proj "gated-gelu", see the quirk below>,
  torch_dtype=torch.float32)(input_ids)[0]` (asserted equal to the pipeline's
  `_get_t5_prompt_embeds` with that encoder); `hidden.f32` = the original safetensors T5 (not from GGUF).
  max |hidden - hidden.f32|: q8_0 {q8['hidden_max_abs_diff_vs_f32']:.4g}, f16 {f16['hidden_max_abs_diff_vs_f32']:.4g}
  (hidden.f32 max abs {t5['hidden_f32_max_abs']:.4g}).

Writer: gguf-py `GGUFWriter(path, "t5encoder")`, tensors in the HF model's order (as
convert_hf_to_gguf.py), names from gguf-py's own `get_tensor_name_map(MODEL_ARCH.T5ENCODER, 2)`;
the tied `shared.weight` / `encoder.embed_tokens.weight` stored once as `token_embd.weight`; no
`output.weight` (encoder only).

### Metadata (`t5_q8_0.gguf`; the f16 file differs only in general.file_type = 1)
Same keys as llama.cpp's `convert_hf_to_gguf.py` `T5EncoderModel` writes (`set_gguf_parameters` +
`set_vocab`). `tokenizer.ggml.*` come from `tokenizer_2/tokenizer.json` (Unigram: pieces, scores;
token_type 3 CONTROL for `<pad>`/`</s>`, 2 UNKNOWN for `<unk>`, 1 NORMAL otherwise; special ids and
add_bos/add_eos by gguf-py's `SpecialVocab`); no `tokenizer.ggml.precompiled_charsmap` (the tiny
tokenizer has no sentencepiece model; the real T5 files carry one).
```
{md_lines}
```

### Tensors (torch shape = reversed GGUF dims)
```
{tensor_lines}
```
Block 0 holds the only relative attention bias (`attn_rel_b`, [buckets 32, heads 4]); block 1 has
none (HF T5 shares block 0's).

## How transformers {transformers.__version__} loads it
`general.architecture` "t5encoder" has no entry in the new GGUF path (`integrations/gguf`,
`GGUF_ARCHS`/`GGUF_CONFIG_ARCHS` = qwen35, qwen35moe, lfm2), so both the config and the weights go
through the legacy `modeling_gguf_pytorch_utils.load_gguf_checkpoint`: arch "t5encoder" -> "t5"
(`updated_architecture`; `architectures` = ["T5EncoderModel"], `is_gated_act` = True forced),
metadata keys `t5encoder.X` renamed `t5.X` and mapped by `GGUF_CONFIG_MAPPING["t5"]`:
context_length -> n_positions, block_count -> num_layers, feed_forward_length -> d_ff,
embedding_length -> d_model, attention.key_length -> d_kv, attention.head_count -> num_heads,
attention.layer_norm_epsilon -> layer_norm_epsilon, attention.relative_buckets_count ->
relative_attention_num_buckets (value_length, layer_norm_rms_epsilon: not mapped); vocab_size =
len(tokenizer.ggml.tokens) (the file has no `t5encoder.vocab_size`, as llama.cpp's), so the tokenizer
keys are needed for the model to load at the right vocab; `tie_word_embeddings` = no `output.weight`.
Config dict derived from the metadata (`load_gguf_checkpoint(..., return_tensors=False)["config"]`):
```
{derived}
```
**Quirk (transformers {transformers.__version__}):** that dict sets `is_gated_act` but not
`feed_forward_proj`, so T5Config keeps "relu" and `dense_act_fn` = "relu": the stock
`T5EncoderModel.from_pretrained(folder, gguf_file=...)` is a gated-ReLU T5 ({json.dumps(q8['stock_transformers_config'])}),
not T5 v1.1's gated-gelu (`gelu_new`, what llama.cpp's T5 and FLUX's T5-XXL compute). The
reference therefore passes `config=T5Config(**<that dict minus model_type>, feed_forward_proj="gated-gelu")`
to the same `from_pretrained(..., gguf_file=..., torch_dtype=torch.float32)`; weights load identically
(asserted). Stock (gated-ReLU) vs reference hidden max abs diff: q8_0
{q8['stock_gated_relu_hidden_max_abs_diff_vs_reference']:.4g}, f16 {f16['stock_gated_relu_hidden_max_abs_diff_vs_reference']:.4g}.
Also: GGUF stores `layer_norm_epsilon` as float32, so the loaded config has 1e-6 rounded to f32
(9.99999997e-07), which the reference keeps (the f32 safetensors T5 uses 1e-6).
Resulting `model.config` (selected fields):
```
{loaded}
```
Tensors: gguf-py `get_tensor_name_map(MODEL_ARCH.T5, 2)` (model_type "t5") maps the HF names
(`shared` -> token_embd, `encoder.block.N.layer.0.SelfAttention.q/k/v/o` -> enc.blk.N.attn_q/k/v/o,
`...relative_attention_bias` -> enc.blk.N.attn_rel_b, `layer.0.layer_norm` -> attn_norm,
`layer.1.DenseReluDense.wi_0/wi_1/wo` -> ffn_gate/ffn_up/ffn_down, `layer.1.layer_norm` -> ffn_norm,
`encoder.final_layer_norm` -> enc.output_norm); `T5TensorProcessor` changes nothing; every tensor is
dequantized with gguf-py's numpy `gguf.quants.dequantize` and cast to float32. Asserted: every
parameter of the loaded model equals, bit for bit, the numpy dequantization of its file tensor
(F16 -> f32 exact; `encoder.embed_tokens.weight` is `token_embd` via tying).

## Pipeline run (`runs/t5_q8_0_bare`, `runs.json`)
`FluxFillPipeline.from_pretrained("tests/fixtures/fill_pipeline/tiny", text_encoder_2=<T5 from t5_q8_0.gguf>,
torch_dtype=float32)`, run exactly as `tests/fixtures/edit`'s `bare` (gen_edit_adapters.py):
`diptych.png` 128x48 + `mask.png` (right half 255; copies here), the prompt above, height 48,
width 128, {edit.STEPS} steps, guidance {edit.GUIDANCE}, max_sequence_length {edit.MAX_SEQ}, seed 42,
`generator=torch.Generator("cpu").manual_seed(42)`. Files: `diptych_out.png` (output_type "pil"),
`edit.png` (right half), `image.safetensors` (`image` [1, 3, 48, 128] in [0, 1], output_type "pt").
vs `tests/fixtures/edit/runs/bare/image.safetensors` (same run with the f32 T5): max abs diff
{run['max_abs_diff_vs_edit_bare']:.4g}, mean {run['mean_abs_diff_vs_edit_bare']:.4g}.

## Notes
- Images are the noise a random tiny model makes, not pictures.
- `fixtures.json` holds every tensor's type and dims, the full metadata, and the configs above.
"""
    (T5_OUT / "README.md").write_text(text)


def fp8_readme(meta):
    fp = meta["fp8"]
    a = fp["files"]["flux_fp8_e4m3fn.safetensors"]["tensors"]
    b = fp["files"]["flux_fp8_scaled.safetensors"]["tensors"]

    def lines(tensors, names):
        return "\n".join(f"  {n}  {tensors[n]['dtype']}  {tensors[n]['shape']}" for n in names)

    ex = ["img_in.weight", "img_in.bias", "time_in.in_layer.weight", "double_blocks.0.img_attn.qkv.weight",
          "double_blocks.0.img_attn.qkv.bias", "double_blocks.0.img_attn.norm.query_norm.scale",
          "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight",
          "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight", "final_layer.linear.bias"]
    ex_b = ["scaled_fp8"] + [x for n in ex for x in ([n, n.removesuffix(".weight") + ".scale_weight"]
                                                   if n.removesuffix(".weight") + ".scale_weight" in b else [n])]
    n_fp8 = sum(1 for v in a.values() if v["dtype"] == "float8_e4m3fn")
    rows = "\n".join(
        f"| {k} | {v['max_abs_diff_vs_f32']:.4g} | {v['mean_abs_diff_vs_f32']:.4g} | "
        f"{v['max_rel_weight_error']['fp8']:.4g} | {v['max_rel_weight_error']['bf16']:.3g} |"
        for k, v in fp["forward"].items() if isinstance(v, dict))
    text = f"""# FP8 (float8 e4m3fn) FLUX.1 Fill transformers (BFL names, ComfyUI-style single files)

Made by `tests/reference/gen_t5_gguf_fp8.py` (part B). Regenerate (deterministic, CPU, f32,
1 thread; byte-identical reruns) from the repo root with

    .venv-ref/bin/python tests/reference/gen_t5_gguf_fp8.py

Versions in `fixtures.json`. The model is `tests/fixtures/gguf`'s tiny FLUX.1 Fill transformer
(config `tests/fixtures/gguf/transformer/config.json`: hidden 256, 1 double + 1 single block),
rebuilt by `gen_gguf.build_model()` (seed 20) and put in BFL names by `gen_gguf.to_bfl` (names and
fused layouts as `flux1-fill-dev.safetensors`; see tests/fixtures/gguf/README.md).

## Files
Which tensors are fp8: every 2-D `.weight` under `double_blocks.*`, `single_blocks.*` and
`final_layer.*` ({n_fp8} tensors). Kept bfloat16 (`w.to(torch.bfloat16)`): the embedders (`img_in`,
`txt_in`, `time_in.*`, `vector_in.*`, `guidance_in.*`, weights and biases) and every 1-D tensor
(biases, `*.norm.*.scale`). No safetensors `__metadata__`.

- `flux_fp8_e4m3fn.safetensors`: every key prefixed `model.diffusion_model.` (as ComfyUI full
  checkpoints carry it); fp8 weights are a plain cast `w.to(torch.float8_e4m3fn)` (round to nearest
  even; all |w| < 448, no scale tensor).
- `flux_fp8_scaled.safetensors`: no prefix (as ComfyUI's diffusion-model-only files); ComfyUI's
  "scaled fp8" layout: marker `scaled_fp8` = `torch.empty(0, dtype=torch.float8_e4m3fn)` (ComfyUI's
  model_detection reads the marker's dtype as the fp8 format and its element count: 2 means "no fp8
  matmul", anything else fp8 matmul allowed; ComfyUI's own saver writes an empty tensor of the fp8
  dtype); each fp8 weight `q = (w / s).to(torch.float8_e4m3fn)` with `<module>.scale_weight` = s =
  max|w| / 448 (float32, 0-dim, computed in f32), so the largest |q| is 448. No `scale_input`.

Key patterns (dtype, shape), plain file (all keys with the `model.diffusion_model.` prefix):
```
{lines(a, ['model.diffusion_model.' + n for n in ex])}
```
Scaled file:
```
{lines(b, ex_b)}
```
Every key and dtype: `fixtures.json` (`fp8.files.<file>.tensors`); the scales: `scale_weight`.

## Reference (`forward.safetensors`)
Upcast as torch does: `w = fp8_tensor.to(torch.float32) * scale_weight.to(torch.float32)` (scale 1
when absent, i.e. just `.to(float32)`), bf16 -> float32; BFL -> diffusers with gen_gguf.py's
patched `convert_flux_transformer_checkpoint_to_diffusers` (inner_dim from the config); a plain
`FluxTransformer2DModel(**config)` in f32 with those weights, called on
`tests/fixtures/gguf/forward.safetensors`'s inputs (asserted identical; same call: hidden_states
[1, 24, 384], encoder_hidden_states [1, 8, 32], pooled_projections [1, 32], timestep 0.7, guidance
3.5, txt_ids zeros [8, 3], img_ids (0, row, col) for a 4 x 6 grid). Saved: the inputs, `out.f32`
(unquantized; equals tests/fixtures/gguf's `out.f32`), `out.fp8`, `out.fp8_scaled` ([1, 24, 64]).

| file | max abs diff vs out.f32 | mean abs diff | max rel weight error (fp8 tensors) | (bf16 tensors) |
|---|---|---|---|---|
{rows}

(`out.f32` max abs {fp['out_f32_max_abs']:.4g}; out.fp8 vs out.fp8_scaled max abs
{fp['forward']['fp8_vs_fp8_scaled_max_abs']:.4g}.) Relative weight error = max |upcast - w| / max |w| per tensor.
"""
    (FP8_OUT / "README.md").write_text(text)


# =============================================================================================


def folder_size(d):
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main():
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for d in (T5_OUT, FP8_OUT):
        if d.exists():
            shutil.rmtree(d)
    meta = {}
    make_t5(meta)
    make_fp8(meta)
    v = versions()
    t5_meta = {"versions": v, **meta["t5"]}
    (T5_OUT / "fixtures.json").write_text(json.dumps(t5_meta, indent=1))
    (FP8_OUT / "fixtures.json").write_text(json.dumps({"versions": v, **meta["fp8"]}, indent=1))
    t5_readme(meta)
    fp8_readme(meta)
    for d in (T5_OUT, FP8_OUT):
        log(f"wrote {d} ({folder_size(d) / 1e6:.3f} MB)")
        for f in sorted(d.rglob("*")):
            if f.is_file():
                log(f"  {f.relative_to(d)}  {f.stat().st_size}")


if __name__ == "__main__":
    main()
