"""Fixtures for the edit adapters (plain LoRA in PEFT / kohya form, ICEdit MoE-LoRA) on the tiny
FLUX.1 Fill pipeline of tests/fixtures/fill_pipeline/tiny (built by gen_fill_pipeline.py).

tests/fixtures/edit/
  adapters/
    lora_peft.safetensors          PEFT LoRA r=4 alpha=8 (scale 2), written by diffusers' save_lora_weights
    lora_peft_nometa.safetensors   the same tensors, no metadata (diffusers: alpha = rank, scale 1)
    lora_kohya.safetensors         the same LoRA in sd-scripts / BFL naming (fused qkv, linear1), .alpha tensors
    moe_lora.safetensors           ICEdit-style MoE-LoRA: plain r=4 LoRA + 4 experts (r=4) with a router
                                   on double `ff.net.2` and single `proj_out`
  source.png, diptych.png, mask.png   the diptych inputs (64x48 source, 128x48 diptych, right half masked)
  runs/<run>/                      whole FluxFillPipeline runs: diptych_out.png, edit.png, image.safetensors
  runs.json                        run parameters, max-abs differences vs bare, routing, notes, versions
  forward.safetensors              one transformer forward: inputs and one output per adapter
  forward_routing.json             MoE expert counts per layer for the MoE forwards
  moe_layer.safetensors            one MoE layer alone: input x, outputs for top_k 1 and 2
  README.md

The MoE reference (class MoELoRALinear below) implements SPEC section 4: per token,
logits = route(x); top-k; softmax over the k selected logits only; zeros elsewhere;
y = W x + b + sum_e w_e * B_e A_e x * (alpha / rank).

Run (from the repo root, in the reference venv):
  .venv-ref/bin/python tests/reference/gen_edit_adapters.py
"""

import inspect
import json
import logging
import re
import shutil
import struct
import tempfile
from pathlib import Path

import diffusers
import diffusers.loaders.lora_conversion_utils as lora_conversion_utils
import diffusers.loaders.lora_pipeline as lora_pipeline
import numpy as np
import peft
import safetensors
import torch
import torch.nn.functional as F
import transformers
from diffusers import FluxFillPipeline
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "fill_pipeline" / "tiny"
OUT = ROOT / "tests" / "fixtures" / "edit"
ADAPTERS = OUT / "adapters"
RUNS = OUT / "runs"

INSTRUCTION = "make it night"
PROMPT = (
    "A diptych with two side-by-side images of the same scene. On the right, the scene is "
    "exactly the same as on the left but " + INSTRUCTION
)
SRC_W, SRC_H = 64, 48
STEPS = 4
GUIDANCE = 50.0
MAX_SEQ = 512

RANK = 4
ALPHA = 8
NUM_EXPERTS = 4
# LoRA init: A ~ N(0, 1/sqrt(in_features)), B ~ N(0, B_STD) (plain layers and every expert), so
# each layer's delta (scale 2) is a bit under the size of the base layer's output: the adapters
# change the result clearly without swamping it (x_embedder has 384 inputs, the rest 32..160).
B_STD = 0.1
ROUTE_STD = 1.0  # router rows ~ N(0, ROUTE_STD)
# Router seed, picked so that no token of the fixture runs sits near a routing tie (the smallest
# gap between the k-th and (k+1)-th logit stays well above f32 noise; asserted below).
ROUTE_SEED = 13
MIN_ROUTE_MARGIN = 1e-2  # router logits reach about 20


def lora_a(out_rank, in_features, g):
    return torch.randn(out_rank, in_features, generator=g) / in_features**0.5


def lora_b(out_features, rank, g):
    return torch.randn(out_features, rank, generator=g) * B_STD

DOUBLE = ["norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2"]
SINGLE = ["norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v"]
MOE_DOUBLE = "ff.net.2"
MOE_SINGLE = "proj_out"
MOE_PROBE = "single_transformer_blocks.0.proj_out"

# Runs: name -> (adapter file, kind, adapter weight, top_k, seed)
RUN_TABLE = [
    ("bare", None, "none", None, None, 42),
    ("lora_peft", "lora_peft.safetensors", "peft", 1.0, None, 42),
    ("lora_peft_nometa", "lora_peft_nometa.safetensors", "peft_nometa", 1.0, None, 42),
    ("lora_kohya", "lora_kohya.safetensors", "kohya", 1.0, None, 42),
    ("moe", "moe_lora.safetensors", "moe", 1.0, 1, 42),
    ("moe_top2", "moe_lora.safetensors", "moe", 1.0, 2, 7),
    ("lora_peft_weighted", "lora_peft.safetensors", "peft", 0.75, None, 42),
]


def log(*a):
    print(*a, flush=True)


def fresh_pipe():
    return FluxFillPipeline.from_pretrained(TINY, torch_dtype=torch.float32)


def target_modules(cfg):
    out = ["x_embedder"]
    for i in range(cfg.num_layers):
        out += [f"transformer_blocks.{i}.{m}" for m in DOUBLE]
    for i in range(cfg.num_single_layers):
        out += [f"single_transformer_blocks.{i}.{m}" for m in SINGLE]
    return out


def is_moe(module):
    if module.startswith("transformer_blocks."):
        return module.endswith("." + MOE_DOUBLE)
    if module.startswith("single_transformer_blocks."):
        return module.endswith("." + MOE_SINGLE)
    return False


def lora_config_dict(modules):
    """The LoraConfig as a dict, as handed to save_lora_weights. target_modules is a set in
    LoraConfig; it is sorted here so that the written metadata does not depend on hash order."""
    d = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(modules)).to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    return d


def diffusers_style_metadata(config_dict):
    """Exactly what diffusers' write_lora_layers puts in the safetensors header."""
    packed = {f"transformer.{k}": v for k, v in config_dict.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def canonical_metadata_order(path):
    """safetensors writes the header's `__metadata__` entries in hash-map order, which changes from
    one process to the next. Rewrite just that: the entries sorted by key, same header length,
    tensors and every other byte untouched, so reruns give identical files."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n], object_pairs_hook=dict)
    if "__metadata__" not in header:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n, (len(text), n)
    text += b" " * (n - len(text))
    before = load_file(path), file_metadata(path)
    Path(path).write_bytes(raw[:8] + text + raw[8 + n :])
    after = load_file(path), file_metadata(path)
    assert before[1] == after[1] and before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def file_metadata(path):
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    return None if md is None else dict(sorted(md.items()))


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(f"{record.levelname}: {record.getMessage()}")


def capture_diffusers_logs():
    """Collects diffusers' log lines (info and up) until release()."""
    handler = LogCapture()
    handler.saved_level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_info()
    logging.getLogger("diffusers").addHandler(handler)
    return handler


def release(handler):
    logging.getLogger("diffusers").removeHandler(handler)
    diffusers_logging.set_verbosity(handler.saved_level)


# ---------------------------------------------------------------------------------------------
# Inputs


def source_image():
    """A deterministic colourful scene: sky gradient, sun, ground, a house with a window."""
    h, w = SRC_H, SRC_W
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    sky = y < 30
    img[..., 0] = np.where(sky, 90 + 2.0 * y, 60 + 1.5 * x)
    img[..., 1] = np.where(sky, 150 + 2.5 * y, 140 + 40 * np.sin(x / 4.0))
    img[..., 2] = np.where(sky, 240 - 1.5 * y, 50 + 0.8 * y)
    sun = (x - 50) ** 2 + (y - 9) ** 2 < 36
    img[sun] = [255, 220, 40]
    house = (x >= 10) & (x < 30) & (y >= 20) & (y < 40)
    img[house] = [200, 60, 50]
    roof = (y >= 10) & (y < 20) & (np.abs(x - 20) <= (y - 10) + 0.5)
    img[roof] = [120, 40, 140]
    window = (x >= 15) & (x < 21) & (y >= 25) & (y < 31)
    img[window] = [250, 250, 170]
    img += np.random.default_rng(21).normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


def diptych(src):
    """As ICEdit's inference script: the source pasted at (0,0) and at (W,0); right half masked."""
    w, h = src.size
    canvas = Image.new("RGB", (2 * w, h))
    canvas.paste(src, (0, 0))
    canvas.paste(src, (w, 0))
    m = np.zeros((h, 2 * w), np.uint8)
    m[:, w:] = 255
    return canvas, Image.fromarray(m, "L")


# ---------------------------------------------------------------------------------------------
# Adapters


def make_peft_lora(modules):
    """A PEFT LoRA added with diffusers' add_adapter, all A and B randomised, saved by diffusers."""
    pipe = fresh_pipe()
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(modules))
    pipe.transformer.add_adapter(config)
    wrapped = sorted(n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == sorted(modules), set(wrapped) ^ set(modules)
    g = torch.Generator("cpu").manual_seed(101)
    params = dict(pipe.transformer.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if ".lora_A." in name:
                p.copy_(lora_a(*p.shape, g))
            elif ".lora_B." in name:
                p.copy_(lora_b(*p.shape, g))
    state = get_peft_model_state_dict(pipe.transformer)
    tmp = Path(tempfile.mkdtemp())
    try:
        FluxFillPipeline.save_lora_weights(
            tmp,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=lora_config_dict(modules),
            safe_serialization=True,
        )
        written = list(tmp.iterdir())
        assert [p.name for p in written] == ["pytorch_lora_weights.safetensors"], written
        shutil.move(str(written[0]), ADAPTERS / "lora_peft.safetensors")
        canonical_metadata_order(ADAPTERS / "lora_peft.safetensors")
    finally:
        shutil.rmtree(tmp)
    sd = load_file(ADAPTERS / "lora_peft.safetensors")
    assert len(sd) == 2 * len(modules)
    for m in modules:
        assert f"transformer.{m}.lora_A.weight" in sd and f"transformer.{m}.lora_B.weight" in sd, m
    return sd


def kohya_from_peft(sd, cfg):
    """sd-scripts / BFL naming. Fused modules: lora_down = cat of the A's, lora_up = block diagonal
    of the B's, alpha = 2 * rank of the fused module (kohya scale = alpha / lora_down.shape[0])."""
    scale = ALPHA / RANK
    out = {}

    def a(m):
        return sd[f"transformer.{m}.lora_A.weight"]

    def b(m):
        return sd[f"transformer.{m}.lora_B.weight"]

    def plain(name, m):
        out[f"lora_unet_{name}.lora_down.weight"] = a(m).clone()
        out[f"lora_unet_{name}.lora_up.weight"] = b(m).clone()
        out[f"lora_unet_{name}.alpha"] = torch.tensor(scale * a(m).shape[0], dtype=torch.float32)

    def fused(name, ms):
        down = torch.cat([a(m) for m in ms], dim=0)
        out[f"lora_unet_{name}.lora_down.weight"] = down.contiguous()
        out[f"lora_unet_{name}.lora_up.weight"] = torch.block_diag(*[b(m) for m in ms]).contiguous()
        out[f"lora_unet_{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)

    plain("img_in", "x_embedder")
    for i in range(cfg.num_layers):
        t = f"transformer_blocks.{i}"
        plain(f"double_blocks_{i}_img_mod_lin", f"{t}.norm1.linear")
        fused(f"double_blocks_{i}_img_attn_qkv", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"])
        plain(f"double_blocks_{i}_img_attn_proj", f"{t}.attn.to_out.0")
        plain(f"double_blocks_{i}_img_mlp_2", f"{t}.ff.net.2")
    for i in range(cfg.num_single_layers):
        t = f"single_transformer_blocks.{i}"
        fused(
            f"single_blocks_{i}_linear1",
            [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"],
        )
        plain(f"single_blocks_{i}_linear2", f"{t}.proj_out")
        plain(f"single_blocks_{i}_modulation_lin", f"{t}.norm.linear")
    return out


def make_moe(modules, pipe_for_shapes):
    """ICEdit-format MoE-LoRA: plain LoRA on the non-MoE targets, experts + router on the MoE ones."""
    g = torch.Generator("cpu").manual_seed(202)
    g_route = torch.Generator("cpu").manual_seed(ROUTE_SEED)
    t = pipe_for_shapes.transformer
    sd = {}
    for m in modules:
        lin = t.get_submodule(m)
        out_f, in_f = lin.weight.shape
        if not is_moe(m):
            sd[f"transformer.{m}.lora_A.weight"] = lora_a(RANK, in_f, g)
            sd[f"transformer.{m}.lora_B.weight"] = lora_b(out_f, RANK, g)
            continue
        for k in range(NUM_EXPERTS):
            sd[f"transformer.{m}.lora_A.expert_{k}.weight"] = lora_a(RANK, in_f, g)
            sd[f"transformer.{m}.lora_B.expert_{k}.weight"] = lora_b(out_f, RANK, g)
        sd[f"transformer.{m}.lora_route.weight"] = torch.randn(NUM_EXPERTS, in_f, generator=g_route) * ROUTE_STD
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, ADAPTERS / "moe_lora.safetensors", metadata=diffusers_style_metadata(lora_config_dict(modules)))
    canonical_metadata_order(ADAPTERS / "moe_lora.safetensors")
    return sd


# ---------------------------------------------------------------------------------------------
# MoE reference


class MoELoRALinear(torch.nn.Module):
    """y = base(x) + sum_e w_e(x) * B_e A_e x * scale, w = softmax over the top-k router logits
    (zeros for the unselected experts). Dense on purpose: every expert is computed and weighted."""

    def __init__(self, base, route, a, b, scale, top_k):
        super().__init__()
        self.base = base
        self.route = torch.nn.Parameter(route.clone(), requires_grad=False)
        self.a = torch.nn.ParameterList([torch.nn.Parameter(x.clone(), requires_grad=False) for x in a])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(x.clone(), requires_grad=False) for x in b])
        self.scale = scale
        self.top_k = top_k
        self.calls = []  # per call: dict(idx, margin, x, y) (x, y only while keep_io)
        self.keep_io = False

    def forward(self, x):
        y = self.base(x)
        logits = F.linear(x, self.route)  # [..., E]
        vals, idx = logits.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, idx, vals.softmax(dim=-1))
        for e in range(len(self.a)):
            y = y + weights[..., e : e + 1] * F.linear(F.linear(x, self.a[e]), self.b[e]) * self.scale
        ordered = logits.sort(dim=-1, descending=True).values
        margin = (ordered[..., self.top_k - 1] - ordered[..., self.top_k]).min().item()
        entry = {"idx": idx.reshape(-1, self.top_k).clone(), "margin": margin,
                 "max_abs_logit": logits.abs().max().item()}
        if self.keep_io:
            entry["x"] = x.detach().clone()
            entry["y"] = y.detach().clone()
        self.calls.append(entry)
        return y


def install_moe(pipe, moe_sd, top_k):
    """Plain part through diffusers/peft (from a file with the same style of metadata, target
    modules restricted to the plain ones), MoE part by replacing the modules on their parents."""
    modules = sorted({k.split(".lora_")[0].removeprefix("transformer.") for k in moe_sd})
    plain = [m for m in modules if not is_moe(m)]
    moe = [m for m in modules if is_moe(m)]
    plain_sd = {k: v for k, v in moe_sd.items() if k.removeprefix("transformer.").split(".lora_")[0] in plain}
    tmp = Path(tempfile.mkdtemp())
    try:
        path = tmp / "plain.safetensors"
        save_file(plain_sd, path, metadata=diffusers_style_metadata(lora_config_dict(plain)))
        pipe.load_lora_weights(path, adapter_name="edit")
    finally:
        shutil.rmtree(tmp)
    t = pipe.transformer
    for m in plain:
        layer = t.get_submodule(m)
        assert isinstance(layer, LoraLayer) and layer.scaling["edit"] == ALPHA / RANK, (m, layer)
    layers = {}
    for m in moe:
        base = t.get_submodule(m)
        assert type(base) is torch.nn.Linear, (m, type(base))
        a = [moe_sd[f"transformer.{m}.lora_A.expert_{k}.weight"] for k in range(NUM_EXPERTS)]
        b = [moe_sd[f"transformer.{m}.lora_B.expert_{k}.weight"] for k in range(NUM_EXPERTS)]
        layer = MoELoRALinear(base, moe_sd[f"transformer.{m}.lora_route.weight"], a, b, ALPHA / RANK, top_k)
        parent_name, child = m.rsplit(".", 1)
        setattr(t.get_submodule(parent_name), child, layer)
        layers[m] = layer
    return layers


# ---------------------------------------------------------------------------------------------
# diffusers' kohya conversion, made to work on the tiny model

KOHYA_NOTES = {}


def patched_kohya_converter(cfg):
    """diffusers 0.42.1 `_convert_kohya_flux_lora_to_diffusers`, source-patched in two places:
    1. the single-block `linear1` split sizes are hard-coded for FLUX.1 ([3072]*3 + [12288]); they
       are replaced by the tiny model's sizes (otherwise an AssertionError);
    2. `lora_unet_img_in` is converted to the key `x_embedder.lora_*` without the `transformer.`
       prefix, so load_lora_weights silently drops it; it is given the prefix.
    Everything else (key mapping, sparse split of the fused modules, alpha / rank scaling) is
    diffusers' own code."""
    src = inspect.getsource(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = 4 * inner
    old = "dims=[3072, 3072, 3072, 12288]"
    assert src.count(old) == 1
    only_dims = src.replace(old, f"dims=[{inner}, {inner}, {inner}, {mlp}]")
    pattern = r'("lora_unet_img_in",\s*)"x_embedder"'
    assert len(re.findall(pattern, only_dims)) == 1
    full = re.sub(pattern, r'\1"transformer.x_embedder"', only_dims)

    def build(text):
        ns = dict(vars(lora_conversion_utils))
        exec(compile(text, lora_conversion_utils.__file__, "exec"), ns)
        return ns["_convert_kohya_flux_lora_to_diffusers"]

    return build(only_dims), build(full)


class use_converter:
    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        self.saved = lora_pipeline._convert_kohya_flux_lora_to_diffusers
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = self.fn

    def __exit__(self, *exc):
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = self.saved


# ---------------------------------------------------------------------------------------------
# Runs


def load_adapter(pipe, kind, file, weight, top_k, moe_sd, converter):
    """Returns (moe layers or {}, captured diffusers log lines)."""
    handler = capture_diffusers_logs()
    layers = {}
    try:
        if kind in ("peft", "peft_nometa"):
            pipe.load_lora_weights(ADAPTERS / file, adapter_name="edit")
        elif kind == "kohya":
            with use_converter(converter):
                pipe.load_lora_weights(ADAPTERS / file, adapter_name="edit")
        elif kind == "moe":
            layers = install_moe(pipe, moe_sd, top_k)
        if kind in ("peft", "peft_nometa", "kohya") and weight != 1.0:
            pipe.set_adapters(["edit"], adapter_weights=[weight])
    finally:
        release(handler)
    if kind != "none":
        want = {"peft": ALPHA / RANK * weight, "peft_nometa": 1.0 * weight, "kohya": 1.0 * weight,
                "moe": ALPHA / RANK * weight}[kind]
        scalings = {m.scaling["edit"] for m in pipe.transformer.modules() if isinstance(m, LoraLayer)}
        assert scalings == {want}, (kind, scalings, want)
    return layers, handler.records


def moe_counts(layers, call=None):
    out = {}
    for name, layer in sorted(layers.items()):
        calls = layer.calls if call is None else [layer.calls[call]]
        idx = torch.cat([c["idx"] for c in calls]).reshape(-1)
        out[name] = torch.bincount(idx, minlength=NUM_EXPERTS).tolist()
    return out


def check_diversity(counts, what):
    for name, c in counts.items():
        assert sum(1 for v in c if v > 0) >= 2, f"{what}: {name} sends all tokens to one expert: {c}"
    total = np.sum([c for c in counts.values()], axis=0)
    assert np.all(total > 0), f"{what}: an expert is never used: {counts}"


def forward_inputs():
    g = torch.Generator("cpu").manual_seed(303)
    rows, cols, t = 6, 8, 7
    return {
        "img": torch.randn(1, rows * cols, 384, generator=g),
        "img_ids": FluxFillPipeline._prepare_latent_image_ids(1, rows, cols, "cpu", torch.float32),
        "txt": torch.randn(1, t, 32, generator=g),
        "txt_ids": torch.zeros(t, 3),
        "pooled": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([GUIDANCE]),
    }


def transformer_forward(pipe, fx):
    with torch.no_grad():
        return pipe.transformer(
            hidden_states=fx["img"],
            timestep=fx["timestep"],
            guidance=fx["guidance"],
            pooled_projections=fx["pooled"],
            encoder_hidden_states=fx["txt"],
            txt_ids=fx["txt_ids"],
            img_ids=fx["img_ids"],
            return_dict=False,
        )[0]


def pipeline_call(pipe, image, mask, seed, output_type):
    with torch.no_grad():
        return pipe(
            prompt=PROMPT,
            image=image,
            mask_image=mask,
            height=SRC_H,
            width=2 * SRC_W,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            max_sequence_length=MAX_SEQ,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type=output_type,
        ).images


def main():
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_warning()
    diffusers_logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    if OUT.exists():
        shutil.rmtree(OUT)
    ADAPTERS.mkdir(parents=True)
    RUNS.mkdir(parents=True)

    base = fresh_pipe()
    cfg = base.transformer.config
    modules = target_modules(cfg)
    for m in modules:
        assert type(base.transformer.get_submodule(m)) is torch.nn.Linear, m

    # --- adapters ------------------------------------------------------------------------------
    peft_sd = make_peft_lora(modules)
    save_file(peft_sd, ADAPTERS / "lora_peft_nometa.safetensors")
    kohya_sd = kohya_from_peft(peft_sd, cfg)
    save_file(kohya_sd, ADAPTERS / "lora_kohya.safetensors")
    moe_sd = make_moe(modules, base)
    del base

    converter_dims_only, converter = patched_kohya_converter(cfg)

    # What stock diffusers does with the kohya file on this model.
    handler = capture_diffusers_logs()
    try:
        fresh_pipe().load_lora_weights(ADAPTERS / "lora_kohya.safetensors", adapter_name="edit")
        KOHYA_NOTES["stock_diffusers"] = "loaded"
    except AssertionError as e:
        tb = e.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        KOHYA_NOTES["stock_diffusers"] = (
            f"AssertionError in {tb.tb_frame.f_code.co_name} (lora_conversion_utils.py line {tb.tb_lineno}): "
            "`sum(dims) == up_weight.shape[0]` with the hard-coded FLUX.1 dims [3072, 3072, 3072, 12288] "
            "for single_blocks linear1"
        )
    finally:
        release(handler)
    with use_converter(converter_dims_only):
        converted = lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(ADAPTERS / "lora_kohya.safetensors")
    KOHYA_NOTES["converted_keys_without_transformer_prefix"] = sorted(
        k for k in converted if not k.startswith("transformer.")
    )
    with use_converter(converter):
        converted = lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(ADAPTERS / "lora_kohya.safetensors")
    assert set(converted) == set(peft_sd), set(converted) ^ set(peft_sd)
    for k, v in converted.items():
        want = peft_sd[k] * (ALPHA / RANK if ".lora_A." in k else 1.0)
        assert torch.allclose(v, want, atol=1e-6), k

    # --- inputs ----------------------------------------------------------------------------------
    src = source_image()
    src.save(OUT / "source.png")
    dip, mask = diptych(src)
    dip.save(OUT / "diptych.png")
    mask.save(OUT / "mask.png")
    assert dip.size == (2 * SRC_W, SRC_H) and mask.mode == "L"

    fx = forward_inputs()
    forward = {k: v.contiguous() for k, v in fx.items()}
    routing = {}
    runs = []
    images = {}
    outs = {}
    moe_probe = {}

    for name, file, kind, weight, top_k, seed in RUN_TABLE:
        log(f"run {name}")
        folder = RUNS / name
        folder.mkdir()
        pipe = fresh_pipe()
        layers, records = load_adapter(pipe, kind, file, weight, top_k, moe_sd, converter)
        entry = {
            "name": name, "adapter_file": f"adapters/{file}" if file else None, "adapter_kind": kind,
            "lora_scale": {"none": None, "peft": ALPHA / RANK, "peft_nometa": 1.0, "kohya": ALPHA / RANK,
                           "moe": ALPHA / RANK}[kind],
            "adapter_weight": weight, "top_k": top_k, "seed": seed, "steps": STEPS, "guidance": GUIDANCE,
            "max_sequence_length": MAX_SEQ, "width": 2 * SRC_W, "height": SRC_H, "prompt": PROMPT,
        }
        if records:
            entry["diffusers_log"] = records

        # Single transformer forward first (MoE: keep the probe layer's input/output).
        if layers:
            layers[MOE_PROBE].keep_io = True
        out = transformer_forward(pipe, fx)
        outs[name] = out
        forward[f"out_{name}"] = out.contiguous()
        if layers:
            counts = moe_counts(layers)
            check_diversity(counts, f"forward {name}")
            routing[name] = {
                "top_k": top_k,
                "counts": counts,
                "min_topk_margin": min(layer.calls[0]["margin"] for layer in layers.values()),
                "max_abs_logit": max(layer.calls[0]["max_abs_logit"] for layer in layers.values()),
            }
            probe = layers[MOE_PROBE].calls[0]
            moe_probe[name] = probe
            layers[MOE_PROBE].keep_io = False
            for layer in layers.values():
                layer.calls.clear()

        # Whole pipeline: pt for the floats, pil for the PNG (two calls, same seed).
        img = pipeline_call(pipe, dip, mask, seed, "pt")
        assert img.shape == (1, 3, SRC_H, 2 * SRC_W), img.shape
        if layers:
            first = moe_counts(layers, call=0)
            check_diversity(first, f"pipeline first call {name}")
            entry["moe_first_call_counts"] = first
            entry["moe_all_calls_counts"] = moe_counts(layers)
            entry["moe_min_topk_margin"] = min(c["margin"] for layer in layers.values() for c in layer.calls)
            entry["moe_max_abs_logit"] = max(c["max_abs_logit"] for layer in layers.values() for c in layer.calls)
            entry["moe_tokens_per_call"] = {n: int(layer.calls[0]["idx"].shape[0]) for n, layer in layers.items()}
            for layer in layers.values():
                layer.calls.clear()
        pil = pipeline_call(pipe, dip, mask, seed, "pil")[0]
        check = pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(img))[0]
        assert np.array_equal(np.asarray(pil), np.asarray(check)), f"{name}: pil and pt runs differ"
        assert pil.size == (2 * SRC_W, SRC_H)
        pil.save(folder / "diptych_out.png")
        pil.crop((SRC_W, 0, 2 * SRC_W, SRC_H)).save(folder / "edit.png")
        save_file({"image": img.float().contiguous()}, folder / "image.safetensors")
        images[name] = img
        entry["saturated_fraction"] = float(((img <= 0) | (img >= 1)).float().mean())
        runs.append(entry)
        del pipe

    # --- invariants ----------------------------------------------------------------------------
    bare = images["bare"]
    summary = {}
    for entry in runs:
        n = entry["name"]
        entry["max_abs_diff_vs_bare"] = float((images[n] - bare).abs().max())
        entry["mean_abs_diff_vs_bare"] = float((images[n] - bare).abs().mean())
        entry["forward_max_abs_diff_vs_bare"] = float((outs[n] - outs["bare"]).abs().max())
        summary[n] = (entry["max_abs_diff_vs_bare"], entry["forward_max_abs_diff_vs_bare"])
        if n != "bare":
            assert entry["max_abs_diff_vs_bare"] > 10 / 255, (n, entry["max_abs_diff_vs_bare"])
            assert entry["forward_max_abs_diff_vs_bare"] > 0.1 * float(outs["bare"].abs().max()), n
        assert entry["saturated_fraction"] < 0.5, (n, entry["saturated_fraction"])
    kohya_img = float((images["lora_kohya"] - images["lora_peft"]).abs().max())
    kohya_fwd = float((outs["lora_kohya"] - outs["lora_peft"]).abs().max())
    assert kohya_img < 1e-5 and kohya_fwd < 1e-4 * max(1.0, float(outs["lora_peft"].abs().max())), (kohya_img, kohya_fwd)
    nometa_img = float((images["lora_peft_nometa"] - images["lora_peft"]).abs().max())
    nometa_fwd = float((outs["lora_peft_nometa"] - outs["lora_peft"]).abs().max())
    assert nometa_img > 10 / 255 and nometa_fwd > 0.1 * float(outs["bare"].abs().max()), (nometa_img, nometa_fwd)
    half_vs_nometa = float((outs["lora_peft_weighted"] - outs["lora_peft_nometa"]).abs().max())
    moe12 = float((outs["moe"] - outs["moe_top2"]).abs().max())
    assert moe12 > 0, "top_k 1 and 2 forwards are identical"
    for n in ("moe", "moe_top2"):
        assert routing[n]["min_topk_margin"] > MIN_ROUTE_MARGIN, (n, routing[n]["min_topk_margin"])
    for entry in runs:
        if "moe_min_topk_margin" in entry:
            assert entry["moe_min_topk_margin"] > MIN_ROUTE_MARGIN, (entry["name"], entry["moe_min_topk_margin"])

    # Stock diffusers (dims fixed only) drops img_in: how much that changes the forward.
    pipe = fresh_pipe()
    with use_converter(converter_dims_only):
        pipe.load_lora_weights(ADAPTERS / "lora_kohya.safetensors", adapter_name="edit")
    KOHYA_NOTES["lora_modules_when_img_in_is_dropped"] = len(
        [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]
    )
    KOHYA_NOTES["forward_max_abs_diff_vs_peft_when_img_in_is_dropped"] = float(
        (transformer_forward(pipe, fx) - outs["lora_peft"]).abs().max()
    )
    del pipe

    # --- one MoE layer alone -----------------------------------------------------------------------
    p1 = moe_probe["moe"]
    x = p1["x"]
    route = moe_sd[f"transformer.{MOE_PROBE}.lora_route.weight"]
    probe_layer = MoELoRALinear(
        fresh_pipe().transformer.get_submodule(MOE_PROBE),
        route,
        [moe_sd[f"transformer.{MOE_PROBE}.lora_A.expert_{k}.weight"] for k in range(NUM_EXPERTS)],
        [moe_sd[f"transformer.{MOE_PROBE}.lora_B.expert_{k}.weight"] for k in range(NUM_EXPERTS)],
        ALPHA / RANK,
        1,
    )
    with torch.no_grad():
        y1 = probe_layer(x)
        probe_layer.top_k = 2
        y2 = probe_layer(x)
    assert torch.equal(y1, p1["y"]), "probe layer top-1 rerun differs"
    assert float((y1 - y2).abs().max()) > 1e-3
    save_file(
        {"x": x.contiguous(), "y_top1": y1.contiguous(), "y_top2": y2.contiguous()},
        OUT / "moe_layer.safetensors",
    )
    routing_json = {
        "note": "counts = number of (token, selected expert) pairs per expert in one transformer forward "
        "(forward.safetensors inputs); double-block ff.net.2 sees the image tokens only, single-block "
        "proj_out sees text + image tokens (text first).",
        "top_k": {n: routing[n]["top_k"] for n in routing},
        "min_topk_margin": {n: routing[n]["min_topk_margin"] for n in routing},
        "moe": routing["moe"]["counts"],
        "moe_top2": routing["moe_top2"]["counts"],
        "probe_layer": MOE_PROBE,
        "probe_layer_top1_expert_per_token": p1["idx"][:, 0].tolist(),
        "probe_layer_top2_experts_per_token": moe_probe["moe_top2"]["idx"].tolist(),
    }
    (OUT / "forward_routing.json").write_text(json.dumps(routing_json, indent=1))
    save_file(forward, OUT / "forward.safetensors")

    versions = {
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "safetensors": safetensors.__version__, "numpy": np.__version__,
    }
    metadata = {f: file_metadata(ADAPTERS / f) for f in sorted(p.name for p in ADAPTERS.iterdir())}
    (OUT / "runs.json").write_text(
        json.dumps(
            {
                "versions": versions,
                "prompt": PROMPT,
                "inputs": {"source": "source.png", "diptych": "diptych.png", "mask": "mask.png"},
                "forward": {"timestep": 0.7, "guidance": GUIDANCE, "grid": [6, 8], "text_tokens": 7},
                "checks": {
                    "kohya_vs_peft_image_max_abs": kohya_img,
                    "kohya_vs_peft_forward_max_abs": kohya_fwd,
                    "nometa_vs_peft_image_max_abs": nometa_img,
                    "nometa_vs_peft_forward_max_abs": nometa_fwd,
                    "half_vs_nometa_forward_max_abs": half_vs_nometa,
                    "moe_top1_vs_top2_forward_max_abs": moe12,
                },
                "kohya_loading": KOHYA_NOTES,
                "adapter_metadata": metadata,
                "runs": runs,
            },
            indent=1,
        )
    )
    half_same = torch.equal(images["lora_peft_weighted"], images["lora_peft_nometa"]) and torch.equal(
        outs["lora_peft_weighted"], outs["lora_peft_nometa"]
    )
    half_note = "their outputs are bitwise equal" if half_same else (
        f"forward outputs differ by at most {half_vs_nometa:.2e}"
    )
    write_readme(metadata, kohya_sd, peft_sd, moe_sd, half_note)

    # --- summary ---------------------------------------------------------------------------------
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    assert total < 3e6, total
    log("\nmax |run - bare| (pipeline image, transformer forward):")
    for n, (a, b) in summary.items():
        log(f"  {n:18s} {a:.5f}  {b:.4f}")
    log(f"kohya vs peft: image {kohya_img:.2e}, forward {kohya_fwd:.2e}")
    log(f"nometa vs peft: image {nometa_img:.4f}, forward {nometa_fwd:.4f}")
    log(f"weighted (1.5) vs nometa (1) forward: {half_vs_nometa:.2e}")
    log(f"moe top1 vs top2 forward: {moe12:.4f}")
    log(f"forward routing: {json.dumps({n: routing[n]['counts'] for n in routing})}")
    log(f"kohya loading: {json.dumps(KOHYA_NOTES)}")
    log(f"wrote {OUT} ({total / 1e6:.3f} MB)")


def shapes(sd, keys):
    return "\n".join(f"  {k}  {list(sd[k].shape)}" for k in keys)


def write_readme(metadata, kohya_sd, peft_sd, moe_sd, half_note):
    peft_keys = sorted(peft_sd)[:2] + ["transformer.x_embedder.lora_A.weight", "transformer.x_embedder.lora_B.weight"]
    kohya_keys = [
        "lora_unet_img_in.lora_down.weight", "lora_unet_img_in.lora_up.weight", "lora_unet_img_in.alpha",
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", "lora_unet_double_blocks_0_img_attn_qkv.alpha",
        "lora_unet_single_blocks_0_linear1.lora_down.weight", "lora_unet_single_blocks_0_linear1.lora_up.weight",
        "lora_unet_single_blocks_0_linear1.alpha",
    ]
    moe_keys = [
        f"transformer.{MOE_PROBE}.lora_A.expert_0.weight", f"transformer.{MOE_PROBE}.lora_B.expert_0.weight",
        f"transformer.{MOE_PROBE}.lora_route.weight",
        "transformer.transformer_blocks.0.ff.net.2.lora_A.expert_3.weight",
        "transformer.transformer_blocks.0.ff.net.2.lora_route.weight",
        "transformer.x_embedder.lora_A.weight",
    ]
    assert metadata["moe_lora.safetensors"] == metadata["lora_peft.safetensors"]
    assert metadata["lora_peft_nometa.safetensors"] is None and metadata["lora_kohya.safetensors"] is None
    lora_meta = metadata["lora_peft.safetensors"]["lora_adapter_metadata"]
    text = f"""# Edit adapter fixtures

Made by `tests/reference/gen_edit_adapters.py` on the tiny FLUX.1 Fill pipeline
`tests/fixtures/fill_pipeline/tiny` (hidden 32, 1 double + 2 single blocks, in 384). Regenerate
(deterministic, CPU, f32, 1 thread) from the repo root with

    .venv-ref/bin/python tests/reference/gen_edit_adapters.py

## Adapters (`adapters/`)
Targets (ICEdit's): `x_embedder`; double `norm1.linear`, `attn.to_q/k/v`, `attn.to_out.0`,
`ff.net.2`; single `norm.linear`, `proj_mlp`, `proj_out`, `attn.to_q/k/v` (full module paths).
- `lora_peft.safetensors`: PEFT LoRA r=4, lora_alpha=8 (scale 2) added with
  `transformer.add_adapter`, A ~ N(0, 1/sqrt(in)), B ~ N(0, {B_STD}), written by diffusers'
  `FluxFillPipeline.save_lora_weights` (file renamed from `pytorch_lora_weights.safetensors`).
- `lora_peft_nometa.safetensors`: same tensors, `save_file` without metadata: diffusers uses
  alpha = rank, scale 1.
- `lora_kohya.safetensors`: same LoRA, sd-scripts/BFL names, `.alpha` scalar tensors. Fused
  `img_attn_qkv` (rows q,k,v) and `linear1` (rows q,k,v,mlp): lora_down = A's stacked by rows,
  lora_up = block-diagonal of the B's, alpha = 2 * fused rank (kohya scale = alpha / rank = 2).
  Stock diffusers 0.42.1 cannot load it on this model (the `linear1` split sizes are hard-coded
  for FLUX.1) and silently drops `lora_unet_img_in` (converted without the `transformer.` prefix);
  the script runs diffusers' own converter with those two spots patched (see `runs.json`
  `kohya_loading`). Its outputs match `lora_peft` (asserted).
- `moe_lora.safetensors`: ICEdit-format MoE-LoRA. Plain r=4 LoRA on every target except double
  `ff.net.2` and single `proj_out`, which have 4 experts of rank 4 (`lora_A.expert_k`,
  `lora_B.expert_k`) and a router `lora_route.weight` [4, in] (no bias). alpha 8, so every
  expert and plain layer has scale alpha/rank = 2. Per token: logits = route(x), top-k, softmax
  over the k selected logits, zeros elsewhere, y = W x + b + sum_e w_e * 2 * B_e A_e x.

Key examples and shapes:
```
lora_peft / lora_peft_nometa:
{shapes(peft_sd, peft_keys)}
lora_kohya:
{shapes(kohya_sd, kohya_keys)}
moe_lora:
{shapes(moe_sd, moe_keys)}
```

## Inputs
`source.png` 64x48; `diptych.png` 128x48 with the source at (0,0) and (64,0); `mask.png` (L),
0 left, 255 right. Prompt: `{PROMPT}`.

## Pipeline runs (`runs/<name>/`, parameters in `runs.json`)
`FluxFillPipeline(prompt, image=diptych, mask_image=mask, height=48, width=128, steps={STEPS},
guidance_scale={GUIDANCE}, max_sequence_length={MAX_SEQ}, generator=Generator("cpu").manual_seed(seed))`,
pipeline rebuilt from disk for every run. Runs: `bare`, `lora_peft`, `lora_peft_nometa`,
`lora_kohya`, `moe` (top_k 1), `moe_top2` (top_k 2, seed 7), `lora_peft_weighted`
(`set_adapters(["edit"], adapter_weights=[0.75])`, effective scale 1.5). Files: `diptych_out.png` (output_type "pil"), `edit.png` (right half),
`image.safetensors` (`image` [1,3,48,128] in [0,1], output_type "pt"). `runs.json` also holds the
max-abs difference vs `bare`, MoE expert counts (first transformer call and all calls) and versions.

## Transformer forward (`forward.safetensors`)
Inputs in diffusers' call convention: `img` [1,48,384] (6x8 grid), `img_ids` [48,3],
`txt` [1,7,32], `txt_ids` [7,3] (zeros), `pooled` [1,32], `timestep` [1] = 0.7 (already /1000),
`guidance` [1] = {GUIDANCE} (as the pipeline passes it; the transformer multiplies both by 1000).
Outputs `out_<run>` [1,48,64] for the seven adapter setups above. `forward_routing.json`: per
MoE layer expert counts ((token, expert) pairs) for `out_moe` / `out_moe_top2`, and the
per-token experts of `{MOE_PROBE}`. `moe_layer.safetensors`: that layer's input `x`
[1,55,160] (7 text + 48 image tokens) from the `moe` forward, and its outputs `y_top1`, `y_top2`.

## Notes
- The LoRA delta is large on purpose (forward outputs move by about their own size); images
  are the noise a random tiny model makes, not pictures.
- `lora_peft_weighted` (0.75 x scale 2 = 1.5) vs `lora_peft_nometa` (scale 1): {half_note}.
- Router seed chosen so the smallest top-k logit gap in every MoE call of the fixtures is
  > {MIN_ROUTE_MARGIN} (logits reach ~20), so f32 rounding differences should not flip an
  expert choice.
- The diptych's left half is not kept by the pipeline: `diptych_out.png` is all generated.

## Safetensors metadata
- `lora_peft_nometa.safetensors`, `lora_kohya.safetensors`: none.
- `lora_peft.safetensors` (written by diffusers) and `moe_lora.safetensors` (same bytes, built
  the diffusers way; target_modules lists all 19 modules, the MoE ones included):
  `{{"format": "pt", "lora_adapter_metadata": <the JSON below as a string>}}`. The two header
  entries are stored sorted by key (safetensors writes them in hash order; the script fixes
  the order so reruns are byte-identical).

```json
{lora_meta}
```
"""
    (OUT / "README.md").write_text(text)


if __name__ == "__main__":
    main()
