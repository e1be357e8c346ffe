"""Fixtures for GGUF FLUX.1 Fill transformers (BFL tensor names, ggml quant types).

tests/fixtures/gguf/
  dequant.gguf             one tensor per GGML type, `t.<TYPE>`, torch shape [4, 512]
  dequant.safetensors      gguf-py's numpy dequantization of each (float32, [4, 512])
  transformer/config.json  diffusers config of the tiny FLUX.1 Fill transformer (no weights:
                           stands for a GGUF user's download of the pipeline's transformer config)
  flux_q8_0.gguf           that transformer in BFL naming: 2-D weights Q8_0, the rest F32
  flux_q4_k.gguf           2-D weights Q4_K where a row is a multiple of 256, else Q8_0; rest F32
  flux_mixed.gguf          2-D weights cycling through 12 types (every type at least once)
  fixtures.json            per file: metadata and the GGML type of every tensor; dequant layout;
                           diffusers quirks; forward sanity figures; versions
  forward.safetensors      one transformer forward: inputs and out.{f32,q8_0,q4_k,mixed}
  adapters/lora_peft.safetensors   PEFT LoRA r=4 alpha=8 for this transformer (hidden 256)
  adapters/moe_lora.safetensors    ICEdit MoE-LoRA for this transformer
  source.png, diptych.png, mask.png   copies of tests/fixtures/edit's inputs
  runs/<run>/              FluxFillPipeline runs (tests/fixtures/fill_pipeline/tiny with the GGUF
                           transformer): image.safetensors, PNGs
  runs.json                run parameters (same format as tests/fixtures/edit/runs.json) + versions
  README.md

Quantized weights are dequantized exactly as ggml's `dequantize_row_*` (float32 scales), i.e.
gguf-py's numpy `gguf.quants.dequantize`. gguf-py 0.19 can only quantize F16/BF16/Q8_0/Q4_0/Q4_1/
Q5_0/Q5_1; the k-quants (Q2_K..Q6_K) are encoded here by a small numpy quantizer (valid blocks,
per-superblock scales chosen from the data; not byte-identical to ggml's quantizer, which does
not matter since every reference dequantizes the same bytes).

diffusers 0.42.1 is patched in two places (see README): the BFL converter's hard-coded
`inner_dim = 3072` for `single_blocks.*.linear1`, and its torch GGUF decoder (which rounds scale
products to float16) replaced by gguf-py's numpy dequantization.

Run (from the repo root, in the reference venv; deterministic, CPU, f32, 1 thread):
  .venv-ref/bin/python tests/reference/gen_gguf.py
"""

import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import diffusers.loaders.single_file_model as single_file_model  # noqa: E402
import diffusers.loaders.single_file_utils as single_file_utils  # noqa: E402
import diffusers.quantizers.gguf.gguf_quantizer as gguf_quantizer  # noqa: E402
import diffusers.quantizers.gguf.utils as gguf_utils  # noqa: E402
import gguf  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import FluxFillPipeline, FluxTransformer2DModel, GGUFQuantizationConfig  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, GGUFWriter  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_edit_adapters as edit  # noqa: E402
import gen_fill_pipeline as fill  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "fill_pipeline" / "tiny"
EDIT = ROOT / "tests" / "fixtures" / "edit"
OUT = ROOT / "tests" / "fixtures" / "gguf"
TDIR = OUT / "transformer"
ADAPTERS = OUT / "adapters"
RUNS = OUT / "runs"

CONFIG = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
MODEL_SEED = 20
PROJ_OUT_GAIN = 6.0

DEQUANT_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q4_0,
                 Q.Q4_1, Q.Q3_K, Q.Q2_K]
MIXED_CYCLE = [Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q4_0, Q.Q4_1, Q.Q3_K, Q.Q2_K,
               Q.F16, Q.BF16]
KQUANTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
GGUF_NATIVE = {Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
QK_K = 256

FILES = {
    "flux_q8_0.gguf": gguf.LlamaFileType.MOSTLY_Q8_0,
    "flux_q4_k.gguf": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "flux_mixed.gguf": gguf.LlamaFileType.GUESSED,
}

FWD_TIMESTEP = 0.7
FWD_GUIDANCE = 3.5
GRID = (4, 6)  # packed rows, cols: 24 image tokens
TXT_TOKENS = 8

# Pipeline runs: name, transformer file, adapter kind, adapter file, top_k, seed
RUN_TABLE = [
    ("q8_0_bare", "flux_q8_0.gguf", "none", None, None, 42),
    ("q4_k_bare", "flux_q4_k.gguf", "none", None, None, 42),
    ("q4_k_lora", "flux_q4_k.gguf", "peft", "lora_peft.safetensors", None, 42),
    ("q8_0_moe", "flux_q8_0.gguf", "moe", "moe_lora.safetensors", 1, 42),
]
FILL_RUN = dict(name="q4_k_fill", transformer="flux_q4_k.gguf", seed=3, steps=4, guidance=30.0,
                prompt="give him a red scarf", max_sequence_length=512, box=(8, 16, 40, 48),
                image_seed=1, height=48, width=64)

log = edit.log


# ---------------------------------------------------------------------------------------------
# numpy k-quant encoders (any valid encoding; dequantization is the reference)


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16)


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0).astype(np.float32)


def _asym(x, smax, qmax):
    """x: (n, groups, g). Per group q in [0, qmax], y = d*sc*q - dmin*m, sc, m in [0, smax]."""
    lo = np.minimum(x.min(-1), 0).astype(np.float32)
    scale = ((x.max(-1) - lo) / qmax).astype(np.float32)
    d = f16(scale.max(-1) / smax)
    dmin = f16((-lo).max(-1) / smax)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(_div(scale, d32)), 0, smax).astype(np.uint8)
    m = np.clip(np.round(_div(-lo, dmin32)), 0, smax).astype(np.uint8)
    dl = (d32 * sc.astype(np.float32))[..., None]
    ml = (dmin32 * m.astype(np.float32))[..., None]
    q = np.clip(np.round(_div(x + ml, dl)), 0, qmax).astype(np.uint8)
    return d, dmin, sc, m, q


def _sym(x, smax, qlo, qhi):
    """x: (n, groups, g). y = d*sc*q, sc in [-smax-1, smax] (int), q in [qlo, qhi]."""
    amax = np.abs(x).max(-1).astype(np.float32)
    scale = (amax / max(-qlo, qhi)).astype(np.float32)
    d = f16(scale.max(-1) / smax)
    d32 = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(_div(scale, d32)), -smax - 1, smax).astype(np.int32)
    dl = (d32 * sc.astype(np.float32))[..., None]
    q = np.clip(np.round(_div(x, dl)), qlo, qhi).astype(np.int32)
    return d, sc, q


def _pack_k_scales(sc, m):
    """Q4_K / Q5_K: 8 six-bit scales and mins in 12 bytes (ggml's get_scale_min_k4 layout)."""
    s = np.zeros((sc.shape[0], 12), np.uint8)
    s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return s


def _crumbs(q):
    """q (n, 256) 2-bit values -> 64 bytes: value at h*128 + k*32 + l in bits 2k of byte h*32 + l."""
    qq = q.astype(np.uint8).reshape(-1, 2, 4, 32)
    out = qq[:, :, 0] | (qq[:, :, 1] << 2) | (qq[:, :, 2] << 4) | (qq[:, :, 3] << 6)
    return out.reshape(-1, 64)


def enc_q4_k(blocks):
    n = blocks.shape[0]
    d, dmin, sc, m, q = _asym(blocks.reshape(n, 8, 32), 63, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)
    return np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8),
                           _pack_k_scales(sc, m), qs], axis=1)


def enc_q5_k(blocks):
    n = blocks.shape[0]
    d, dmin, sc, m, q = _asym(blocks.reshape(n, 8, 32), 63, 31)
    lo = q & 15
    qs = (lo[:, 0::2] | (lo[:, 1::2] << 4)).reshape(n, 128)
    hi = (q >> 4) & 1  # (n, 8, 32)
    qh = np.zeros((n, 32), np.uint8)
    for i in range(8):
        qh |= hi[:, i] << i
    return np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8),
                           _pack_k_scales(sc, m), qh, qs], axis=1)


def enc_q6_k(blocks):
    n = blocks.shape[0]
    d, sc, q = _sym(blocks.reshape(n, 16, 16), 127, -32, 31)
    u = (q + 32).astype(np.uint8).reshape(n, 256)
    qq = u.reshape(n, 2, 2, 64)
    ql = ((qq[:, :, 0] & 15) | ((qq[:, :, 1] & 15) << 4)).reshape(n, 128)
    qh = _crumbs((u >> 4) & 3)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)


def enc_q3_k(blocks):
    n = blocks.shape[0]
    d, sc, q = _sym(blocks.reshape(n, 16, 16), 31, -4, 3)
    q = q.reshape(n, 256)
    bit = (q >= 0).astype(np.uint8)
    ql = np.where(q >= 0, q, q + 4).astype(np.uint8)
    hmask = np.zeros((n, 32), np.uint8)
    b8 = bit.reshape(n, 8, 32)
    for k in range(8):
        hmask |= b8[:, k] << k
    v = (sc + 32).astype(np.uint8)  # (n, 16) six bits
    s = np.zeros((n, 12), np.uint8)
    s[:, 0:8] = (v[:, 0:8] & 15) | ((v[:, 8:16] & 15) << 4)
    hv = (v >> 4) & 3
    s[:, 8:12] = hv[:, 0:4] | (hv[:, 4:8] << 2) | (hv[:, 8:12] << 4) | (hv[:, 12:16] << 6)
    return np.concatenate([hmask, _crumbs(ql), s, d.reshape(n, 1).view(np.uint8)], axis=1)


def enc_q2_k(blocks):
    n = blocks.shape[0]
    d, dmin, sc, m, q = _asym(blocks.reshape(n, 16, 16), 15, 3)
    scales = (sc | (m << 4)).astype(np.uint8)
    return np.concatenate([scales, _crumbs(q.reshape(n, 256)), d.reshape(n, 1).view(np.uint8),
                           dmin.reshape(n, 1).view(np.uint8)], axis=1)


K_ENCODERS = {Q.Q2_K: enc_q2_k, Q.Q3_K: enc_q3_k, Q.Q4_K: enc_q4_k, Q.Q5_K: enc_q5_k, Q.Q6_K: enc_q6_k}


def quantize(w, qtype):
    """float32 [rows, cols] -> what GGUFWriter.add_tensor takes (array, raw_dtype)."""
    w = np.ascontiguousarray(w, np.float32)
    if qtype == Q.F32:
        return w, None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype in GGUF_NATIVE:
        return gguf.quants.quantize(w, qtype), qtype
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert w.shape[-1] % block == 0
    raw = K_ENCODERS[qtype](w.reshape(-1, block))
    assert raw.shape[1] == size and raw.dtype == np.uint8, (qtype, raw.shape)
    return raw.reshape(w.shape[0], -1), qtype


def dequant_np(raw, qtype):
    """gguf-py's numpy dequantization (ggml's dequantize_row_*), float32."""
    if qtype == Q.F32:
        return np.asarray(raw, np.float32)
    if qtype == Q.F16:
        return np.asarray(raw).view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(np.asarray(raw).view(np.uint8), qtype)


# Relative error bounds of the encoders (max |w - deq| / max |w| over a tensor), sanity only.
ENC_TOL = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q6_K: 0.05, Q.Q5_K: 0.08, Q.Q5_0: 0.08,
           Q.Q5_1: 0.08, Q.Q4_K: 0.15, Q.Q4_0: 0.15, Q.Q4_1: 0.15, Q.Q3_K: 0.35, Q.Q2_K: 0.5, Q.F32: 0}


# ---------------------------------------------------------------------------------------------
# 1. per-type dequantization fixture

DEQUANT_LAYOUT = {
    "F32": "random normal x 0.05, stored as is",
    "F16/BF16/Q8_0/Q5_0/Q5_1/Q4_0/Q4_1": "random normal x 0.05 quantized with gguf.quants.quantize",
    "Q2_K/Q3_K/Q4_K/Q5_K/Q6_K": "random superblocks: every byte uniform random (numpy default_rng), then the "
    "fp16 fields set: d (and dmin for Q2_K/Q4_K/Q5_K) = random sign x uniform [1e-3, 1e-2], rounded to fp16",
    "block_layouts_bytes": {
        "Q2_K": "scales[16] (low nibble scale, high nibble min) | qs[64] | d f16 | dmin f16  (84)",
        "Q3_K": "hmask[32] | qs[64] | scales[12] (6-bit, minus 32) | d f16  (110)",
        "Q4_K": "d f16 | dmin f16 | scales[12] (8 x 6-bit scale + 8 x 6-bit min) | qs[128]  (144)",
        "Q5_K": "d f16 | dmin f16 | scales[12] | qh[32] | qs[128]  (176)",
        "Q6_K": "ql[128] | qh[64] | scales[16] int8 | d f16  (210)",
        "Q8_0": "d f16 | qs[32] int8  (34)", "Q4_0": "d f16 | qs[16]  (18)", "Q4_1": "d f16 | m f16 | qs[16]  (20)",
        "Q5_0": "d f16 | qh[4] | qs[16]  (22)", "Q5_1": "d f16 | m f16 | qh[4] | qs[16]  (24)",
    },
    "rows": "torch shape [4, 512] = 4 rows of 512; GGUF dims [512, 4]; rows stored one after the other, "
    "each row = 512/block_size blocks (2 superblocks for k-quants, 16 blocks for the 32-blocks)",
}

# fp16 field byte offsets within a block, per k-quant
K_FP16_FIELDS = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def make_dequant_fixture(meta):
    rng = np.random.default_rng(1234)
    writer = GGUFWriter(str(OUT / "dequant.gguf"), "flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.GUESSED)
    expected = {}
    types = {}
    for qtype in DEQUANT_TYPES:
        name = f"t.{qtype.name}"
        data = (rng.standard_normal((4, 512)) * 0.05).astype(np.float32)
        if qtype in KQUANTS:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, size=(4 * 512 // block, size), dtype=np.uint8)
            for off in K_FP16_FIELDS[qtype]:
                mag = rng.uniform(1e-3, 1e-2, size=raw.shape[0])
                sign = np.where(rng.integers(0, 2, size=raw.shape[0]) == 1, -1.0, 1.0)
                raw[:, off : off + 2] = f16(mag * sign).reshape(-1, 1).view(np.uint8)
            arr, raw_dtype = raw.reshape(4, -1), qtype
        else:
            arr, raw_dtype = quantize(data, qtype)
        writer.add_tensor(name, arr, raw_dtype=raw_dtype)
        deq = dequant_np(arr, qtype).reshape(4, 512)
        assert deq.dtype == np.float32 and np.all(np.isfinite(deq)), name
        expected[name] = torch.from_numpy(np.ascontiguousarray(deq))
        types[name] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(expected, OUT / "dequant.safetensors")
    # read back: names, types, dims as GGUF stores them
    reader = GGUFReader(str(OUT / "dequant.gguf"))
    for t in reader.tensors:
        assert t.tensor_type.name == types[t.name], t.name
        assert list(map(int, t.shape)) == [512, 4], (t.name, t.shape)
        got = dequant_np(np.asarray(t.data), t.tensor_type).reshape(4, 512)
        assert np.array_equal(got, expected[t.name].numpy()), t.name
    meta["dequant"] = {"tensors": types, "torch_shape": [4, 512], "gguf_dims": [512, 4], "layout": DEQUANT_LAYOUT}


# ---------------------------------------------------------------------------------------------
# 2. tiny transformer, BFL naming, GGUF files


def build_model():
    fill.seeded(MODEL_SEED)
    model = FluxTransformer2DModel(**CONFIG).eval()
    fill.randomize(model)
    with torch.no_grad():
        # Random init leaves proj_out small; a visible velocity makes every step count.
        model.proj_out.weight.mul_(PROJ_OUT_GAIN)
    return model


def swap_halves(w):
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_bfl(sd, cfg):
    """Inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    sd = dict(sd)
    out = {}

    def mv(dst, src):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd.pop(f"{src}.{p}")

    def cat(dst, srcs):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = torch.cat([sd.pop(f"{s}.{p}") for s in srcs], dim=0)

    def norm(dst, src):
        out[f"{dst}.scale"] = sd.pop(f"{src}.weight")

    tte = "time_text_embed"
    for bfl, dif in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                     ("guidance_in", "guidance_embedder")):
        mv(f"{bfl}.in_layer", f"{tte}.{dif}.linear_1")
        mv(f"{bfl}.out_layer", f"{tte}.{dif}.linear_2")
    mv("txt_in", "context_embedder")
    mv("img_in", "x_embedder")
    for i in range(cfg["num_layers"]):
        d, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        mv(f"{d}.img_mod.lin", f"{t}.norm1.linear")
        mv(f"{d}.txt_mod.lin", f"{t}.norm1_context.linear")
        cat(f"{d}.img_attn.qkv", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"])
        cat(f"{d}.txt_attn.qkv", [f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"])
        norm(f"{d}.img_attn.norm.query_norm", f"{t}.attn.norm_q")
        norm(f"{d}.img_attn.norm.key_norm", f"{t}.attn.norm_k")
        norm(f"{d}.txt_attn.norm.query_norm", f"{t}.attn.norm_added_q")
        norm(f"{d}.txt_attn.norm.key_norm", f"{t}.attn.norm_added_k")
        mv(f"{d}.img_mlp.0", f"{t}.ff.net.0.proj")
        mv(f"{d}.img_mlp.2", f"{t}.ff.net.2")
        mv(f"{d}.txt_mlp.0", f"{t}.ff_context.net.0.proj")
        mv(f"{d}.txt_mlp.2", f"{t}.ff_context.net.2")
        mv(f"{d}.img_attn.proj", f"{t}.attn.to_out.0")
        mv(f"{d}.txt_attn.proj", f"{t}.attn.to_add_out")
    for i in range(cfg["num_single_layers"]):
        s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        mv(f"{s}.modulation.lin", f"{t}.norm.linear")
        cat(f"{s}.linear1", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"])
        norm(f"{s}.norm.query_norm", f"{t}.attn.norm_q")
        norm(f"{s}.norm.key_norm", f"{t}.attn.norm_k")
        mv(f"{s}.linear2", f"{t}.proj_out")
    mv("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap_halves(sd.pop(f"norm_out.linear.{p}"))
    assert not sd, sorted(sd)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


STOCK_CONVERTER = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
PATCH_OLD = "inner_dim = 3072"
PATCH_NEW = 'inner_dim = kwargs["config"]["num_attention_heads"] * kwargs["config"]["attention_head_dim"]'


def patched_converter():
    """diffusers' own convert_flux_transformer_checkpoint_to_diffusers, source-patched: the
    hard-coded FLUX.1 width (inner_dim = 3072, used for the single-block linear1 split) replaced
    by the config's num_attention_heads * attention_head_dim. mlp_ratio 4.0 is right here."""
    src = inspect.getsource(STOCK_CONVERTER)
    assert src.count(PATCH_OLD) == 1 and src.count("mlp_ratio = 4.0") == 1
    ns = dict(vars(single_file_utils))
    exec(compile(src.replace(PATCH_OLD, PATCH_NEW), single_file_utils.__file__, "exec"), ns)
    return ns["convert_flux_transformer_checkpoint_to_diffusers"]


PATCHED_CONVERTER = patched_converter()


def install_converter():
    single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"] = PATCHED_CONVERTER


def uninstall_converter():
    single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"] = STOCK_CONVERTER


STOCK_DEQUANT = gguf_utils.dequantize_gguf_tensor
DEQUANT_CALLS = {"n": 0}


def numpy_dequantize_gguf_tensor(tensor):
    """Replacement for diffusers' dequantize_gguf_tensor: gguf-py's numpy dequantization of the
    raw bytes (ggml's dequantize_row_*, float32 scales), returned as float32."""
    if not hasattr(tensor, "quant_type"):
        return tensor
    DEQUANT_CALLS["n"] += 1
    raw = tensor.as_tensor().detach().view(torch.uint8).cpu().numpy()
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, tensor.quant_type), np.float32))


def install_dequant():
    gguf_utils.dequantize_gguf_tensor = numpy_dequantize_gguf_tensor
    gguf_quantizer.dequantize_gguf_tensor = numpy_dequantize_gguf_tensor


def choose_types(bfl, kind):
    types = {}
    cycle = 0
    for name in sorted(bfl):
        w = bfl[name]
        if w.ndim != 2:
            types[name] = Q.F32
            continue
        cols = w.shape[1]
        if kind == "q8_0":
            types[name] = Q.Q8_0 if cols % 32 == 0 else Q.F32
        elif kind == "q4_k":
            types[name] = Q.Q4_K if cols % QK_K == 0 else (Q.Q8_0 if cols % 32 == 0 else Q.F32)
        else:
            chosen = Q.F32
            for step in range(len(MIXED_CYCLE)):
                t = MIXED_CYCLE[(cycle + step) % len(MIXED_CYCLE)]
                block = gguf.GGML_QUANT_SIZES[t][0]
                if cols % block == 0:
                    chosen = t
                    cycle = (cycle + step + 1) % len(MIXED_CYCLE)
                    break
            types[name] = chosen
    return types


def write_model_gguf(path, bfl, types, file_type):
    writer = GGUFWriter(str(path), "flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(file_type))
    raws = {}
    for name in sorted(bfl):
        arr, raw_dtype = quantize(bfl[name].numpy(), types[name])
        writer.add_tensor(name, arr, raw_dtype=raw_dtype)
        raws[name] = arr
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raws


def read_gguf(path):
    """name -> (ggml type, numpy dequantized float32 in torch shape), plus the metadata keys."""
    reader = GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        deq = dequant_np(np.array(t.data), t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type, np.array(deq, np.float32))
    md = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        md[k] = v
    return out, md


def load_gguf_model(path):
    return FluxTransformer2DModel.from_single_file(
        str(path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(TDIR),
        torch_dtype=torch.float32,
        local_files_only=True,
    ).eval()


def forward_inputs():
    g = torch.Generator("cpu").manual_seed(404)
    rows, cols = GRID
    return {
        "hidden_states": torch.randn(1, rows * cols, 384, generator=g),
        "encoder_hidden_states": torch.randn(1, TXT_TOKENS, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([FWD_TIMESTEP]),
        "guidance": torch.tensor([FWD_GUIDANCE]),
        "txt_ids": torch.zeros(TXT_TOKENS, 3),
        "img_ids": FluxFillPipeline._prepare_latent_image_ids(1, rows, cols, "cpu", torch.float32),
    }


def forward(model, fx):
    with torch.no_grad():
        return model(**fx, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------
# 3. adapters and pipelines


def make_peft_lora(model, modules):
    config = LoraConfig(r=edit.RANK, lora_alpha=edit.ALPHA, target_modules=list(modules))
    model.add_adapter(config)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == sorted(modules), set(wrapped) ^ set(modules)
    g = torch.Generator("cpu").manual_seed(101)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if ".lora_A." in name:
                p.copy_(edit.lora_a(*p.shape, g))
            elif ".lora_B." in name:
                p.copy_(edit.lora_b(*p.shape, g))
    state = get_peft_model_state_dict(model)
    tmp = Path(tempfile.mkdtemp())
    try:
        FluxFillPipeline.save_lora_weights(
            tmp, transformer_lora_layers=state,
            transformer_lora_adapter_metadata=edit.lora_config_dict(modules), safe_serialization=True,
        )
        written = list(tmp.iterdir())
        assert [p.name for p in written] == ["pytorch_lora_weights.safetensors"], written
        shutil.move(str(written[0]), ADAPTERS / "lora_peft.safetensors")
        edit.canonical_metadata_order(ADAPTERS / "lora_peft.safetensors")
    finally:
        shutil.rmtree(tmp)
    model.delete_adapters("default")
    sd = load_file(ADAPTERS / "lora_peft.safetensors")
    assert len(sd) == 2 * len(modules)
    return sd


def make_moe(model, modules, route_seed):
    g = torch.Generator("cpu").manual_seed(202)
    g_route = torch.Generator("cpu").manual_seed(route_seed)
    sd = {}
    for m in modules:
        out_f, in_f = model.get_submodule(m).weight.shape
        if not edit.is_moe(m):
            sd[f"transformer.{m}.lora_A.weight"] = edit.lora_a(edit.RANK, in_f, g)
            sd[f"transformer.{m}.lora_B.weight"] = edit.lora_b(out_f, edit.RANK, g)
            continue
        for k in range(edit.NUM_EXPERTS):
            sd[f"transformer.{m}.lora_A.expert_{k}.weight"] = edit.lora_a(edit.RANK, in_f, g)
            sd[f"transformer.{m}.lora_B.expert_{k}.weight"] = edit.lora_b(out_f, edit.RANK, g)
        sd[f"transformer.{m}.lora_route.weight"] = torch.randn(edit.NUM_EXPERTS, in_f, generator=g_route) * edit.ROUTE_STD
    return {k: v.contiguous() for k, v in sd.items()}


def install_moe(pipe, moe_sd, top_k):
    """As gen_edit_adapters.install_moe, on a GGUF base: plain part through load_lora_weights,
    MoE layers by wrapping the GGUFLinear modules in MoELoRALinear."""
    modules = sorted({k.split(".lora_")[0].removeprefix("transformer.") for k in moe_sd})
    plain = [m for m in modules if not edit.is_moe(m)]
    moe = [m for m in modules if edit.is_moe(m)]
    plain_sd = {k: v for k, v in moe_sd.items() if k.removeprefix("transformer.").split(".lora_")[0] in plain}
    tmp = Path(tempfile.mkdtemp())
    try:
        path = tmp / "plain.safetensors"
        save_file(plain_sd, path, metadata=edit.diffusers_style_metadata(edit.lora_config_dict(plain)))
        pipe.load_lora_weights(path, adapter_name="edit")
    finally:
        shutil.rmtree(tmp)
    t = pipe.transformer
    for m in plain:
        layer = t.get_submodule(m)
        assert isinstance(layer, LoraLayer) and layer.scaling["edit"] == edit.ALPHA / edit.RANK, (m, layer)
        assert isinstance(layer.base_layer, gguf_utils.GGUFLinear), m
    layers = {}
    for m in moe:
        base = t.get_submodule(m)
        assert type(base) is gguf_utils.GGUFLinear, (m, type(base))
        a = [moe_sd[f"transformer.{m}.lora_A.expert_{k}.weight"] for k in range(edit.NUM_EXPERTS)]
        b = [moe_sd[f"transformer.{m}.lora_B.expert_{k}.weight"] for k in range(edit.NUM_EXPERTS)]
        layer = edit.MoELoRALinear(base, moe_sd[f"transformer.{m}.lora_route.weight"], a, b,
                                   edit.ALPHA / edit.RANK, top_k)
        parent, child = m.rsplit(".", 1)
        setattr(t.get_submodule(parent), child, layer)
        layers[m] = layer
    return layers


def gguf_pipe(file):
    transformer = load_gguf_model(OUT / file)
    pipe = FluxFillPipeline.from_pretrained(TINY, transformer=transformer, torch_dtype=torch.float32)
    assert pipe.transformer is transformer
    pipe.set_progress_bar_config(disable=True)
    n = sum(isinstance(m, gguf_utils.GGUFLinear) for m in pipe.transformer.modules())
    assert n > 0
    return pipe


def call(pipe, prompt, image, mask, height, width, steps, guidance, max_seq, seed, output_type):
    with torch.no_grad():
        return pipe(
            prompt=prompt, image=image, mask_image=mask, height=height, width=width,
            num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=max_seq,
            generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
        ).images


def run_three(pipe, args):
    """pt (floats), np (checked equal), pil (checked equal to pt's conversion)."""
    img = call(pipe, *args, "pt")
    arr = call(pipe, *args, "np")
    pil = call(pipe, *args, "pil")[0]
    assert np.array_equal(arr[0], img[0].permute(1, 2, 0).numpy()), "np and pt runs differ"
    check = pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(img))[0]
    assert np.array_equal(np.asarray(pil), np.asarray(check)), "pil and pt runs differ"
    return img, pil


# ---------------------------------------------------------------------------------------------


def main():
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    if OUT.exists():
        shutil.rmtree(OUT)
    for d in (TDIR, ADAPTERS, RUNS):
        d.mkdir(parents=True)
    meta = {}
    quirks = {}

    # --- 1 ---------------------------------------------------------------------------------------
    make_dequant_fixture(meta)
    log("dequant fixture written")

    # --- 2 ---------------------------------------------------------------------------------------
    model = build_model()
    model.save_config(TDIR)
    cfg = dict(model.config)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bfl = to_bfl(sd, cfg)

    # The inverse is right: diffusers' own (patched) converter gives the state dict back.
    back = PATCHED_CONVERTER(checkpoint=dict(bfl), config=cfg)
    assert set(back) == set(sd), set(back) ^ set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    try:
        STOCK_CONVERTER(checkpoint=dict(bfl), config=cfg)
        quirks["stock_bfl_converter"] = "converted (unexpected)"
    except Exception as e:  # noqa: BLE001
        quirks["stock_bfl_converter"] = f"{type(e).__name__}: {e}"
    quirks["bfl_converter_patch"] = {"replace": PATCH_OLD, "with": PATCH_NEW}

    fx = forward_inputs()
    out_f32 = forward(model, fx)
    log(f"f32 forward max |out| {float(out_f32.abs().max()):.3f}")
    fwd = {k: v.contiguous() for k, v in fx.items()}
    fwd["out.f32"] = out_f32.contiguous()

    install_converter()
    install_dequant()
    file_info = {}
    stock_diffs = {}
    fwd_checks = {}
    for file, ftype in FILES.items():
        kind = file.removeprefix("flux_").removesuffix(".gguf")
        types = choose_types(bfl, kind)
        write_model_gguf(OUT / file, bfl, types, ftype)
        tensors, md = read_gguf(OUT / file)
        assert {n: t for n, (t, _) in tensors.items()} == types
        if kind == "mixed":
            used = {t for n, t in types.items() if bfl[n].ndim == 2}
            assert set(MIXED_CYCLE) <= used, set(MIXED_CYCLE) - used
        # the weights diffusers would get from the numpy dequantization, in diffusers naming
        deq_bfl = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, (_, a) in tensors.items()}
        deq_sd = PATCHED_CONVERTER(checkpoint=dict(deq_bfl), config=cfg)

        gmodel = load_gguf_model(OUT / file)
        glinears = {n: m for n, m in gmodel.named_modules() if isinstance(m, gguf_utils.GGUFLinear)}
        want_linears = sorted(
            n.removesuffix(".weight") for n in deq_sd
            if n.endswith(".weight") and _src_type(n, types) not in (Q.F32, Q.F16)
        )
        assert sorted(glinears) == want_linears, set(glinears) ^ set(want_linears)
        assert gguf_utils.ops is None
        # bit-exact: what GGUFLinear dequantizes == numpy dequantization of the file (after split)
        for n, m in glinears.items():
            w = gguf_utils.dequantize_gguf_tensor(m.weight)
            assert w.dtype == torch.float32 and torch.equal(w, deq_sd[n + ".weight"]), n
            stock = STOCK_DEQUANT(m.weight).float()
            qn = m.weight.quant_type.name
            stock_diffs[qn] = max(stock_diffs.get(qn, 0.0), float((stock - w).abs().max()))
        # non-GGUF parameters (F32 / F16 in the file) are plain float32 equal to the file
        gsd = gmodel.state_dict()
        for n, v in deq_sd.items():
            if n.removesuffix(".weight") in glinears and n.endswith(".weight"):
                continue
            assert gsd[n].dtype == torch.float32 and torch.equal(gsd[n], v), n
        DEQUANT_CALLS["n"] = 0
        out = forward(gmodel, fx)
        assert DEQUANT_CALLS["n"] == len(glinears), (DEQUANT_CALLS["n"], len(glinears))
        # same forward as a plain f32 model holding the dequantized weights
        plain = FluxTransformer2DModel(**CONFIG).eval()
        plain.load_state_dict(deq_sd)
        out_plain = forward(plain, fx)
        diff = float((out - out_f32).abs().max())
        fwd_checks[kind] = {
            "max_abs_diff_vs_f32": diff,
            "mean_abs_diff_vs_f32": float((out - out_f32).abs().mean()),
            "max_abs_diff_vs_plain_model_with_dequantized_weights": float((out - out_plain).abs().max()),
            "gguf_linear_modules": len(glinears),
        }
        assert 0 < diff < 0.5 * float(out_f32.abs().max()), (kind, diff)
        fwd[f"out.{kind}"] = out.contiguous()
        file_info[file] = {
            "metadata": {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in md.items()},
            "tensor_types": {n: t.name for n, t in sorted(types.items())},
            "tensor_shapes": {n: list(bfl[n].shape) for n in sorted(bfl)},
        }
        log(f"{file}: forward max |q - f32| = {diff:.4g}, vs plain dequantized model "
            f"{fwd_checks[kind]['max_abs_diff_vs_plain_model_with_dequantized_weights']:.3g}")
        del gmodel, plain
    quirks["stock_torch_dequant_max_abs_diff_vs_numpy"] = dict(sorted(stock_diffs.items()))
    save_file(fwd, OUT / "forward.safetensors")

    # encoder sanity (own k-quant encoders and gguf-py's): reconstruction error of the model weights
    enc_err = {}
    for file in FILES:
        tensors, _ = read_gguf(OUT / file)
        for n, (t, a) in tensors.items():
            rel = float(np.abs(a - bfl[n].numpy()).max() / max(float(bfl[n].abs().max()), 1e-12))
            assert rel <= ENC_TOL[t] + 1e-7, (file, n, t.name, rel)
            enc_err[t.name] = max(enc_err.get(t.name, 0.0), rel)

    # --- 3 ---------------------------------------------------------------------------------------
    modules = edit.target_modules(model.config)
    lora_sd = make_peft_lora(build_model(), modules)

    src = Image.open(EDIT / "source.png").convert("RGB")
    assert np.array_equal(np.asarray(src), np.asarray(edit.source_image()))
    dip, mask = edit.diptych(src)
    assert np.array_equal(np.asarray(dip), np.asarray(Image.open(EDIT / "diptych.png")))
    assert np.array_equal(np.asarray(mask), np.asarray(Image.open(EDIT / "mask.png")))
    for f in ("source.png", "diptych.png", "mask.png"):
        shutil.copy(EDIT / f, OUT / f)
    H, W = edit.SRC_H, 2 * edit.SRC_W
    edit_args = (edit.PROMPT, dip, mask, H, W, edit.STEPS, edit.GUIDANCE, edit.MAX_SEQ)

    # MoE router seed: the first from 13 whose pipeline run keeps every top-k gap > MIN margin.
    moe_info = {}
    for route_seed in range(13, 40):
        moe_sd = make_moe(model, modules, route_seed)
        pipe = gguf_pipe("flux_q8_0.gguf")
        layers = install_moe(pipe, moe_sd, 1)
        call(pipe, *edit_args, 42, "pt")
        margin = min(c["margin"] for layer in layers.values() for c in layer.calls)
        counts = edit.moe_counts(layers)
        total = np.sum([c for c in counts.values()], axis=0)
        ok = margin > edit.MIN_ROUTE_MARGIN and all(sum(1 for v in c if v > 0) >= 2 for c in counts.values())
        log(f"route seed {route_seed}: min margin {margin:.4f}, counts {counts}")
        del pipe, layers
        if ok and np.all(total > 0):
            moe_info = {"route_seed": route_seed, "min_topk_margin": margin}
            break
    assert moe_info, "no router seed found"
    save_file(moe_sd, ADAPTERS / "moe_lora.safetensors",
              metadata=edit.diffusers_style_metadata(edit.lora_config_dict(modules)))
    edit.canonical_metadata_order(ADAPTERS / "moe_lora.safetensors")

    runs = []
    images = {}
    lora_notes = {}
    for name, file, kind, afile, top_k, seed in RUN_TABLE:
        log(f"run {name}")
        folder = RUNS / name
        folder.mkdir()
        pipe = gguf_pipe(file)
        layers = {}
        if kind == "peft":
            pipe.load_lora_weights(ADAPTERS / afile, adapter_name="edit")
            lora_layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]
            assert len(lora_layers) == len(modules)
            assert {m.scaling["edit"] for m in lora_layers} == {edit.ALPHA / edit.RANK}
            lora_notes = {
                "how": "pipe.load_lora_weights(adapters/lora_peft.safetensors, adapter_name='edit') on the "
                "GGUF-loaded transformer (diffusers 0.42.1 + peft wrap the GGUFLinear modules; no merge)",
                "lora_modules": len(lora_layers),
                "base_layer_types": sorted({type(m.base_layer).__name__ for m in lora_layers}),
            }
        elif kind == "moe":
            layers = install_moe(pipe, moe_sd, top_k)
        img, pil = run_three(pipe, edit_args + (seed,))
        assert img.shape == (1, 3, H, W)
        pil.save(folder / "diptych_out.png")
        pil.crop((edit.SRC_W, 0, W, H)).save(folder / "edit.png")
        save_file({"image": img.float().contiguous()}, folder / "image.safetensors")
        images[name] = img
        entry = {
            "name": name, "transformer": file, "adapter_file": f"adapters/{afile}" if afile else None,
            "adapter_kind": kind, "lora_scale": None if kind == "none" else edit.ALPHA / edit.RANK,
            "adapter_weight": None if kind == "none" else 1.0, "top_k": top_k, "seed": seed,
            "steps": edit.STEPS, "guidance": edit.GUIDANCE, "max_sequence_length": edit.MAX_SEQ,
            "width": W, "height": H, "prompt": edit.PROMPT,
        }
        if layers:
            entry["moe_first_call_counts"] = edit.moe_counts(layers, call=0)
            entry["moe_all_calls_counts"] = edit.moe_counts(layers)
            entry["moe_min_topk_margin"] = min(c["margin"] for layer in layers.values() for c in layer.calls)
            assert entry["moe_min_topk_margin"] > edit.MIN_ROUTE_MARGIN
        entry["saturated_fraction"] = float(((img <= 0) | (img >= 1)).float().mean())
        runs.append(entry)
        del pipe

    # plain fill with the Q4_K transformer
    fr = FILL_RUN
    log(f"run {fr['name']}")
    folder = RUNS / fr["name"]
    folder.mkdir()
    fimg = fill.test_image(fr["height"], fr["width"], fr["image_seed"])
    fmask = fill.rect_mask(fr["height"], fr["width"], fr["box"])
    fimg.save(folder / "image.png")
    fmask.save(folder / "mask.png")
    pipe = gguf_pipe(fr["transformer"])
    img, pil = run_three(pipe, (fr["prompt"], fimg, fmask, fr["height"], fr["width"], fr["steps"],
                                fr["guidance"], fr["max_sequence_length"], fr["seed"]))
    pil.save(folder / "out.png")
    save_file({"image": img.float().contiguous()}, folder / "image.safetensors")
    images[fr["name"]] = img
    runs.append({
        "name": fr["name"], "transformer": fr["transformer"], "adapter_file": None, "adapter_kind": "none",
        "lora_scale": None, "adapter_weight": None, "top_k": None, "seed": fr["seed"], "steps": fr["steps"],
        "guidance": fr["guidance"], "max_sequence_length": fr["max_sequence_length"], "width": fr["width"],
        "height": fr["height"], "prompt": fr["prompt"], "image": "image.png", "mask": "mask.png",
        "mask_box_top_left_bottom_right": list(fr["box"]),
        "image_note": "gen_fill_pipeline.test_image(48, 64, seed 1), mask 255 inside the box",
        "saturated_fraction": float(((img <= 0) | (img >= 1)).float().mean()),
    })
    del pipe

    # --- sanity --------------------------------------------------------------------------------
    names = list(images)
    pairwise = {}
    for i, a in enumerate(names):
        assert float(images[a].max() - images[a].min()) > 0.1, f"{a} is (nearly) constant"
        for b in names[i + 1:]:
            if images[a].shape == images[b].shape:
                d = float((images[a] - images[b]).abs().max())
                pairwise[f"{a} vs {b}"] = d
                assert d > 10 / 255, (a, b, d)
    for entry in runs:
        assert entry["saturated_fraction"] < 0.5, (entry["name"], entry["saturated_fraction"])

    versions = {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "gguf": gguf_version(), "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    metadata = {f: edit.file_metadata(ADAPTERS / f) for f in sorted(p.name for p in ADAPTERS.iterdir())}
    (OUT / "runs.json").write_text(json.dumps({
        "versions": versions,
        "prompt": edit.PROMPT,
        "inputs": {"source": "source.png", "diptych": "diptych.png", "mask": "mask.png"},
        "pipeline": "tests/fixtures/fill_pipeline/tiny with transformer = FluxTransformer2DModel.from_single_file"
        "(<gguf>, quantization_config=GGUFQuantizationConfig(compute_dtype=float32), config=transformer/)",
        "lora_on_gguf": lora_notes,
        "moe": moe_info,
        "max_abs_diff_between_runs": pairwise,
        "adapter_metadata": metadata,
        "runs": runs,
    }, indent=1))

    meta["files"] = file_info
    meta["forward"] = {
        "inputs": {k: list(v.shape) for k, v in fx.items()},
        "timestep": FWD_TIMESTEP, "guidance": FWD_GUIDANCE, "grid_packed": list(GRID), "text_tokens": TXT_TOKENS,
        "out_f32_max_abs": float(out_f32.abs().max()),
        "checks": fwd_checks,
    }
    meta["encoder_max_rel_error"] = dict(sorted(enc_err.items()))
    meta["diffusers_quirks"] = quirks
    meta["moe_route_seed"] = moe_info["route_seed"]
    meta["versions"] = versions
    (OUT / "fixtures.json").write_text(json.dumps(meta, indent=1))
    write_readme(meta, lora_sd, moe_sd, runs, fwd_checks, quirks)

    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    log(json.dumps(fwd_checks, indent=1))
    log(json.dumps(quirks, indent=1))
    log(f"pairwise image diffs: {json.dumps(pairwise)}")
    log(f"wrote {OUT} ({total / 1e6:.3f} MB)")
    assert total < 12.5e6, total


def _src_type(dname, types):
    rules = [
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        ("context_embedder", "txt_in"), ("x_embedder", "img_in"),
        ("norm_out.linear", "final_layer.adaLN_modulation.1"), ("proj_out", "final_layer.linear"),
    ]
    base = dname.removesuffix(".weight")
    for d, b in rules:
        if base == d:
            return types[b + ".weight"]
    parts = base.split(".")
    i = parts[1]
    rest = ".".join(parts[2:])
    if parts[0] == "transformer_blocks":
        m = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
             "attn.to_q": "img_attn.qkv", "attn.to_k": "img_attn.qkv", "attn.to_v": "img_attn.qkv",
             "attn.add_q_proj": "txt_attn.qkv", "attn.add_k_proj": "txt_attn.qkv", "attn.add_v_proj": "txt_attn.qkv",
             "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
             "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
        key = f"double_blocks.{i}.{m[rest]}.weight" if rest in m else None
    else:
        m = {"norm.linear": "modulation.lin", "attn.to_q": "linear1", "attn.to_k": "linear1",
             "attn.to_v": "linear1", "proj_mlp": "linear1", "proj_out": "linear2"}
        key = f"single_blocks.{i}.{m[rest]}.weight" if rest in m else None
    return types[key] if key else Q.F32


def gguf_version():
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001
        return "unknown"


def _shapes(sd, keys):
    return "\n".join(f"  {k}  {list(sd[k].shape)}" for k in keys)


def write_readme(meta, lora_sd, moe_sd, runs, fwd_checks, quirks):
    files = meta["files"]
    q8 = files["flux_q8_0.gguf"]
    mixed = files["flux_mixed.gguf"]["tensor_types"]
    mixed_2d = "\n".join(
        f"  {n}  {files['flux_mixed.gguf']['tensor_shapes'][n]}  {t}"
        for n, t in mixed.items() if len(files["flux_mixed.gguf"]["tensor_shapes"][n]) == 2
    )
    example_names = [
        "img_in.weight", "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.norm.query_norm.scale",
        "double_blocks.0.txt_mlp.0.weight", "single_blocks.0.linear1.weight", "single_blocks.0.linear1.bias",
        "single_blocks.0.linear2.weight", "single_blocks.0.norm.key_norm.scale",
        "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight",
    ]
    examples = "\n".join(f"  {n}  {q8['tensor_shapes'][n]}  (q8_0: {q8['tensor_types'][n]}, "
                         f"q4_k: {files['flux_q4_k.gguf']['tensor_types'][n]})" for n in example_names)
    lora_keys = ["transformer.x_embedder.lora_A.weight", "transformer.x_embedder.lora_B.weight",
                 "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",
                 "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"]
    moe_keys = [f"transformer.{edit.MOE_PROBE}.lora_A.expert_0.weight",
                f"transformer.{edit.MOE_PROBE}.lora_B.expert_0.weight",
                f"transformer.{edit.MOE_PROBE}.lora_route.weight",
                "transformer.transformer_blocks.0.ff.net.2.lora_route.weight"]
    checks = "\n".join(
        f"| {k} | {v['max_abs_diff_vs_f32']:.4g} | {v['mean_abs_diff_vs_f32']:.4g} | "
        f"{v['max_abs_diff_vs_plain_model_with_dequantized_weights']:.3g} | {v['gguf_linear_modules']} |"
        for k, v in fwd_checks.items()
    )
    stock = ", ".join(f"{k} {v:.3g}" for k, v in quirks["stock_torch_dequant_max_abs_diff_vs_numpy"].items())
    run_lines = "\n".join(
        f"- `{r['name']}`: {r['transformer']}, adapter {r['adapter_kind']}"
        + (f" (`{r['adapter_file']}`)" if r["adapter_file"] else "")
        + (f", top_k {r['top_k']}" if r["top_k"] else "") + f", seed {r['seed']}"
        for r in runs
    )
    text = f"""# GGUF fixtures (FLUX.1 Fill transformer in BFL naming, ggml quant types)

Made by `tests/reference/gen_gguf.py`. Regenerate (deterministic, CPU, f32, 1 thread; byte-identical
reruns) from the repo root with

    .venv-ref/bin/python tests/reference/gen_gguf.py

Versions are in `fixtures.json` / `runs.json` (`versions`). Reference dequantization everywhere:
gguf-py's numpy `gguf.quants.dequantize` = ggml's `dequantize_row_*` with float32 scales (the fp16
`d`/`dmin` fields converted to f32, products in f32), then everything in f32.

## 1. Per-type dequantization (`dequant.gguf`, `dequant.safetensors`)
`dequant.gguf` holds one tensor per type, named `t.<TYPE>` for TYPE in
{", ".join(t.name for t in DEQUANT_TYPES)}; torch shape [4, 512] (GGUF dims [512, 4], i.e. 4 rows
of 512, rows one after the other, each row = 512/block_size blocks). F32: random normal x 0.05;
F16/BF16/Q8_0/Q5_0/Q5_1/Q4_0/Q4_1: that data quantized with `gguf.quants.quantize`; k-quants
(Q2_K/Q3_K/Q4_K/Q5_K/Q6_K): random superblocks, every byte uniform random, then the fp16 fields
(`d`, and `dmin` for Q2_K/Q4_K/Q5_K) set to random sign x U[1e-3, 1e-2] (finite, no NaN/Inf).
Block layouts (bytes): see `fixtures.json` `dequant.layout`.
`dequant.safetensors`: the same names, float32 [4, 512] = `gguf.quants.dequantize(raw, type)`.
Metadata as below (`general.file_type` = 1024, GUESSED).

## 2. Tiny FLUX.1 Fill transformer
`transformer/config.json`: diffusers `FluxTransformer2DModel` config: patch 1, in 384, out 64,
1 double + 1 single block, 2 heads x 128 (hidden 256), joint_attention_dim 32, pooled 32,
guidance_embeds true, axes_dims_rope [16, 56, 56]. Only the config (stands for a GGUF user's
download: the GGUF carries no RoPE axes). Random init (seed {MODEL_SEED}), norm scales U[0.5, 1.5], biases
N(0, 0.1), `proj_out` x {PROJ_OUT_GAIN} (as gen_fill_pipeline.py's randomize). Widths: every matrix row
(in_features) is a multiple of 256 except `img_in` (384), `txt_in` and `vector_in.in_layer` (32).

GGUF files (written with gguf-py's `GGUFWriter`, tensors sorted by name, BFL names exactly as in
`flux1-fill-dev.safetensors`, no prefix). Metadata keys (as city96's ComfyUI-GGUF files):
`general.architecture` = "flux", `general.quantization_version` = 2, `general.file_type`
(q8_0: 7 MOSTLY_Q8_0, q4_k: 14 MOSTLY_Q4_K_S, mixed: 1024 GUESSED). All 1-D tensors (biases,
`*.norm.*.scale`) are F32.
- `flux_q8_0.gguf`: every 2-D weight Q8_0 (all rows here are multiples of 32).
- `flux_q4_k.gguf`: 2-D weights with rows a multiple of 256 Q4_K, the others (`img_in`, `txt_in`,
  `vector_in.in_layer`) Q8_0.
- `flux_mixed.gguf`: 2-D weights in name order cycle through Q8_0, Q6_K, Q5_K, Q5_0, Q5_1, Q4_K,
  Q4_0, Q4_1, Q3_K, Q2_K, F16, BF16 (a type that does not fit the row is skipped; every type occurs).
The types of every tensor are in `fixtures.json` (`files.<file>.tensor_types`, shapes in torch
order in `tensor_shapes`). Q8_0/Q4_x/Q5_x/F16/BF16 are `gguf.quants.quantize`'s encodings; the
k-quants are encoded by the script's numpy quantizer (per-superblock fp16 `d`/`dmin` from the
data, 6-bit (Q4_K/Q5_K), 4-bit (Q2_K), signed 6-bit (Q3_K) or int8 (Q6_K) sub-block scales,
rounded quants); a valid encoding, not byte-identical to ggml's quantizer.

Tensor names and torch shapes (examples):
```
{examples}
```
Fused rows: `img_attn.qkv` / `txt_attn.qkv` = rows q, k, v (3 x 256); `single_blocks.0.linear1` =
rows q, k, v, mlp (256, 256, 256, 1024 = 1792); `linear2` takes [attn 256 | mlp 1024] = 1280;
`final_layer.adaLN_modulation.1` = diffusers `norm_out.linear` with its halves swapped (BFL: shift
first, then scale). The mixed file's matrices:
```
{mixed_2d}
```

### Forward (`forward.safetensors`)
Inputs (diffusers call convention): `hidden_states` [1, 24, 384] (4 x 6 packed grid),
`encoder_hidden_states` [1, 8, 32], `pooled_projections` [1, 32], `timestep` [1] = {FWD_TIMESTEP}
(already /1000, as FluxFillPipeline passes it), `guidance` [1] = {FWD_GUIDANCE} (as the pipeline passes
it; the transformer multiplies both by 1000), `txt_ids` zeros [8, 3], `img_ids` [24, 3]
(`_prepare_latent_image_ids(1, 4, 6)`: (0, row, col)). Outputs [1, 24, 64]: `out.f32` (the
unquantized model), `out.q8_0`, `out.q4_k`, `out.mixed` (each GGUF loaded by diffusers
`FluxTransformer2DModel.from_single_file(path, quantization_config=GGUFQuantizationConfig(compute_dtype=float32),
config="tests/fixtures/gguf/transformer", torch_dtype=float32)` with the two patches below).

| file | max abs diff vs out.f32 | mean abs diff | vs plain f32 model holding the dequantized weights | GGUFLinear modules |
|---|---|---|---|---|
{checks}

(`out.f32` max abs {meta['forward']['out_f32_max_abs']:.4g}.) Asserted for every GGUF-loaded linear:
the weight diffusers' `GGUFLinear` uses equals, bit for bit, the numpy dequantization of the file's
tensor after the BFL -> diffusers split; F32/F16 tensors load as plain float32 equal to the file;
the patched decoder is called once per GGUFLinear per forward.

## diffusers 0.42.1 quirks patched by the script
1. `convert_flux_transformer_checkpoint_to_diffusers` (loaders/single_file_utils.py) hard-codes
   `inner_dim = 3072` (FLUX.1's width) for the `single_blocks.*.linear1` split. Stock result on
   this model: `{quirks['stock_bfl_converter']}`. The script runs diffusers' own converter source
   with that line replaced by `inner_dim = config.num_attention_heads * config.attention_head_dim`
   (mlp_ratio 4 is right), installed in `SINGLE_FILE_LOADABLE_CLASSES`.
2. diffusers' torch GGUF decoder (`quantizers/gguf/utils.py`, `dequantize_blocks_*`) computes in the
   fp16 of the scales (scale products rounded to float16, result fp16). It is replaced (in
   `utils` and `gguf_quantizer`) by gguf-py's numpy `gguf.quants.dequantize` returning float32;
   `GGUFLinear.forward_native` (the CPU path; no CUDA kernels) calls it. Stock-vs-numpy max abs
   difference over the loaded weights, per type: {stock}.
3. GGUF F16 tensors are not GGUFParameters in diffusers: they load as plain tensors cast to
   float32 (exact); BF16 tensors are GGUFLinear weights (exact too).

## 3. Pipelines (`runs/`, `runs.json`)
`FluxFillPipeline.from_pretrained("tests/fixtures/fill_pipeline/tiny", transformer=<GGUF transformer>)`
(the tiny pipeline's text encoders give joint 32 / pooled 32, matching), pipeline rebuilt for
every run. Edit runs as `tests/fixtures/edit` (`gen_edit_adapters.py`): `source.png` 64x48 ->
`diptych.png` 128x48 + `mask.png` (right half 255), prompt `{edit.PROMPT}`,
height 48, width 128, {edit.STEPS} steps, guidance {edit.GUIDANCE}, max_sequence_length {edit.MAX_SEQ}, f32,
`generator=torch.Generator("cpu").manual_seed(seed)`:
{run_lines}
Files per edit run: `diptych_out.png` (output_type "pil"), `edit.png` (right half),
`image.safetensors` (`image` [1, 3, H, W] in [0, 1], output_type "pt"; the "np" run is asserted
equal to it, permuted). `q4_k_fill` is a plain fill like gen_fill_pipeline.py's runs:
`image.png` (gen_fill_pipeline `test_image(48, 64, 1)`), `mask.png` (255 in rows 8..40, cols 16..48),
prompt "{FILL_RUN['prompt']}", height 48, width 64, {FILL_RUN['steps']} steps, guidance {FILL_RUN['guidance']},
max_sequence_length {FILL_RUN['max_sequence_length']}, seed {FILL_RUN['seed']}; `out.png` and `image.safetensors`.
Asserted: no image is (nearly) constant, every pair of same-size images (the four edit runs) differs by > 10/255 (`runs.json`
`max_abs_diff_between_runs`).

Adapters (`adapters/`), targets as ICEdit's for this transformer (x_embedder; double
`norm1.linear`, `attn.to_q/k/v`, `attn.to_out.0`, `ff.net.2`; single `norm.linear`, `proj_mlp`,
`proj_out`, `attn.to_q/k/v`; 13 modules):
- `lora_peft.safetensors`: PEFT LoRA r=4, lora_alpha=8 (scale 2), made like
  gen_edit_adapters.py's `lora_peft` (A ~ N(0, 1/sqrt(in)), B ~ N(0, {edit.B_STD}), generator seed 101)
  on the unquantized model, written by `FluxFillPipeline.save_lora_weights` (metadata sorted).
  Loaded in `q4_k_lora` with `pipe.load_lora_weights(..., adapter_name="edit")` directly on the
  GGUF transformer: diffusers 0.42.1 + peft wrap the `GGUFLinear` modules (LoRA added at run time,
  nothing merged), no workaround needed.
- `moe_lora.safetensors`: ICEdit MoE-LoRA made like gen_edit_adapters.py's `moe_lora` (plain r=4
  LoRA + 4 experts of rank 4 and a router [4, in] on double `ff.net.2` and single `proj_out`,
  alpha 8, top_k 1 in `q8_0_moe`); router seed {meta.get('moe_route_seed')} (first seed from 13 whose pipeline run keeps
  every top-k logit gap > {edit.MIN_ROUTE_MARGIN}). Installed as gen_edit_adapters.py does: plain part with
  `load_lora_weights`, MoE layers wrapped in its `MoELoRALinear` (base = the GGUFLinear).
  Expert counts and the smallest top-k gap are in `runs.json`.

Key examples and shapes:
```
lora_peft:
{_shapes(lora_sd, lora_keys)}
moe_lora:
{_shapes(moe_sd, moe_keys)}
```

## Notes
- Images are the noise a random tiny model makes, not pictures.
- Quantization error is visible (forward diffs above), so a port that ignores the quantized
  values cannot match; diffusers' stock f16 decoder differs from the reference by up to the
  per-type figures above per weight, so a port must use f32 scale products to match tightly.
- `forward.safetensors` `out.<file>` equals (0 difference) a plain f32 diffusers model loaded with
  the numpy-dequantized weights: a port can check its dequantization and its forward separately.
"""
    (OUT / "README.md").write_text(text)


if __name__ == "__main__":
    main()
