"""Fixtures for STACKED adapters (two adapters active at once) on the tiny FLUX.1 Fill pipeline of
tests/fixtures/fill_pipeline/tiny, on top of the single-adapter fixtures of gen_edit_adapters.py
(tests/fixtures/edit, which must exist: its adapters and diptych inputs are reused, not rebuilt).

tests/fixtures/stacked/
  adapters/second_kohya.safetensors  a second plain LoRA (r=4, alpha=8) in sd-scripts / BFL naming
  runs/<run>/edit.png, image.safetensors   whole FluxFillPipeline diptych edits:
      peft_plus_kohya   edit/adapters/lora_peft.safetensors as "a" (weight 0.7)
                        + second_kohya.safetensors as "b" (weight 0.5), both through diffusers/PEFT
      moe_plus_peft     edit/adapters/moe_lora.safetensors (Python MoE reference, top_k 1, weight 1)
                        + second_kohya.safetensors as "b" (weight 0.5) through diffusers/PEFT
      second_kohya      second_kohya.safetensors alone (weight 0.5), to debug the file by itself
  forward.safetensors   one transformer forward (inputs: edit/forward.safetensors) per setup
  runs.json             run parameters, scalings, max-abs differences vs bare / each single adapter
  README.md

Run (from the repo root, in the reference venv, after gen_edit_adapters.py):
  .venv-ref/bin/python tests/reference/gen_stacked_adapters.py
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_edit_adapters as g  # noqa: E402

ROOT = g.ROOT
EDIT = g.OUT  # tests/fixtures/edit (inputs, first adapters, single-adapter runs)
OUT = ROOT / "tests" / "fixtures" / "stacked"
ADAPTERS = OUT / "adapters"
RUNS = OUT / "runs"
SECOND = ADAPTERS / "second_kohya.safetensors"

RANK = 4
ALPHA = 8  # kohya scale alpha / rank = 2 on every (unfused) module
# Second LoRA's A/B values: A ~ N(0, 1/sqrt(in)) as lora_peft's (g.lora_a), B ~ N(0, 3 * g.B_STD)
# (g.lora_b times B_GAIN: its targets move the output less than lora_peft's x_embedder and
# modulation layers, so B is made larger for the second adapter to matter clearly on its own). The
# seed is picked (of 400..459) so that in moe_plus_peft no token sits near a routing tie: the
# smallest gap between the top-1 and second router logit over every MoE call of the pipeline run
# is 0.027 (> g.MIN_ROUTE_MARGIN, asserted); with most seeds it falls below 0.01 somewhere in
# the 4 steps.
SECOND_SEED = 415
B_GAIN = 3.0
WEIGHT_A = 0.7  # set_adapters weight of lora_peft ("a")
WEIGHT_B = 0.5  # set_adapters weight of second_kohya ("b")
SEED = 42
TOP_K = 1

# Second LoRA targets (PEFT / diffusers module names), grouped as they are written in kohya form.
# All but `attn.to_add_out` are also lora_peft / moe_lora targets, so on those layers two adapters
# add up; `to_add_out` (text stream output projection) is targeted by the second LoRA alone.
# single `proj_out` is an MoE layer of moe_lora: there the LoRA sits under the MoE delta.
SECOND_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.to_add_out"]
SECOND_SINGLE = ["proj_mlp", "proj_out"]


def log(*a):
    print(*a, flush=True)


def second_modules(cfg):
    out = []
    for i in range(cfg.num_layers):
        out += [f"transformer_blocks.{i}.{m}" for m in SECOND_DOUBLE]
    for i in range(cfg.num_single_layers):
        out += [f"single_transformer_blocks.{i}.{m}" for m in SECOND_SINGLE]
    return out


def make_second_lora(t, modules):
    """The second LoRA in PEFT form ({module: (A [r, in], B [out, r])}), values from SECOND_SEED."""
    gen = torch.Generator("cpu").manual_seed(SECOND_SEED)
    lora = {}
    for m in modules:
        out_f, in_f = t.get_submodule(m).weight.shape
        lora[m] = (g.lora_a(RANK, in_f, gen), g.lora_b(out_f, RANK, gen) * B_GAIN)
    return lora


def kohya_second(lora, cfg):
    """sd-scripts / BFL naming for the second LoRA (a variant of g.kohya_from_peft, which needs every
    part of a fused module; here single-block `linear1` carries proj_mlp only):
      img_attn_qkv  all of q, k, v: lora_down = A's stacked by rows [12, in], lora_up = block
                    diagonal of the B's [3h, 12], alpha 24 (scale 24/12 = 2): diffusers' "sparse" split;
      linear1       proj_mlp only: lora_down = A_mlp [4, in], lora_up [3h + mlp, 4] with B_mlp in the
                    mlp rows and zeros in the q, k, v rows, alpha 8: not block diagonal, so diffusers
                    shares lora_down across q, k, v, mlp and gives q, k, v all-zero lora_B's;
      img_attn_proj (to_out.0), txt_attn_proj (to_add_out), linear2 (proj_out): plain, alpha 8."""
    scale = ALPHA / RANK
    out = {}

    def put(name, down, up):
        out[f"lora_unet_{name}.lora_down.weight"] = down.contiguous()
        out[f"lora_unet_{name}.lora_up.weight"] = up.contiguous()
        out[f"lora_unet_{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)

    inner = cfg.num_attention_heads * cfg.attention_head_dim
    for i in range(cfg.num_layers):
        t = f"transformer_blocks.{i}"
        qkv = [lora[f"{t}.attn.{p}"] for p in ("to_q", "to_k", "to_v")]
        put(f"double_blocks_{i}_img_attn_qkv", torch.cat([a for a, _ in qkv]), torch.block_diag(*[b for _, b in qkv]))
        put(f"double_blocks_{i}_img_attn_proj", *lora[f"{t}.attn.to_out.0"])
        put(f"double_blocks_{i}_txt_attn_proj", *lora[f"{t}.attn.to_add_out"])
    for i in range(cfg.num_single_layers):
        t = f"single_transformer_blocks.{i}"
        a, b = lora[f"{t}.proj_mlp"]
        up = torch.zeros(3 * inner + b.shape[0], RANK)
        up[3 * inner :] = b
        put(f"single_blocks_{i}_linear1", a, up)
        put(f"single_blocks_{i}_linear2", *lora[f"{t}.proj_out"])
    return out


def lora_delta(x, a, b, scale):
    return F.linear(F.linear(x, a), b) * scale


def moe_delta(x, moe_sd, m, top_k):
    """The MoE-LoRA part of one layer, written out again (as g.MoELoRALinear computes it)."""
    p = f"transformer.{m}"
    logits = F.linear(x, moe_sd[f"{p}.lora_route.weight"])
    vals, idx = logits.topk(top_k, dim=-1)
    w = torch.zeros_like(logits).scatter(-1, idx, vals.softmax(dim=-1))
    y = torch.zeros(*x.shape[:-1], moe_sd[f"{p}.lora_B.expert_0.weight"].shape[0])
    for e in range(g.NUM_EXPERTS):
        y = y + w[..., e : e + 1] * lora_delta(
            x, moe_sd[f"{p}.lora_A.expert_{e}.weight"], moe_sd[f"{p}.lora_B.expert_{e}.weight"], g.ALPHA / g.RANK
        )
    return y


class Probe:
    """Keeps the first (input, output) of some modules during a transformer forward."""

    def __init__(self, t, names):
        self.io = {}
        self.hooks = [t.get_submodule(n).register_forward_hook(self.hook(n)) for n in names]

    def hook(self, name):
        def fn(module, args, output):
            if name not in self.io:
                self.io[name] = (args[0].detach().clone(), output.detach().clone())

        return fn

    def remove(self):
        for h in self.hooks:
            h.remove()


_BARE = []


def base_linear(m):
    if not _BARE:
        _BARE.append(g.fresh_pipe().transformer)
    lin = _BARE[0].get_submodule(m)
    assert type(lin) is torch.nn.Linear
    return lin.weight.detach(), lin.bias.detach()


def scalings(t):
    """{adapter: sorted set of the scaling values PEFT uses} over every LoRA layer."""
    out = {}
    for mod in t.modules():
        if isinstance(mod, LoraLayer):
            for k, v in mod.scaling.items():
                out.setdefault(k, set()).add(v)
    return {k: sorted(v) for k, v in sorted(out.items())}


def lora_modules(t, adapter):
    return sorted(n for n, mod in t.named_modules() if isinstance(mod, LoraLayer) and adapter in mod.lora_A)


def active(t):
    return sorted({a for mod in t.modules() if isinstance(mod, LoraLayer) for a in mod.active_adapters})


# ---------------------------------------------------------------------------------------------
# Setups: each returns (pipe, moe layers or {}, notes)


def setup(name, converter, moe_sd):
    pipe = g.fresh_pipe()
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer
    notes = {}
    layers = {}
    handler = g.capture_diffusers_logs()
    try:
        if name == "bare":
            pass
        elif name == "peft_a":
            pipe.load_lora_weights(g.ADAPTERS / "lora_peft.safetensors", adapter_name="a")
            pipe.set_adapters(["a"], adapter_weights=[WEIGHT_A])
        elif name == "moe":
            layers = g.install_moe(pipe, moe_sd, TOP_K)
        elif name == "second_kohya":
            with g.use_converter(converter):
                pipe.load_lora_weights(SECOND, adapter_name="b")
            pipe.set_adapters(["b"], adapter_weights=[WEIGHT_B])
        elif name == "peft_plus_kohya":
            pipe.load_lora_weights(g.ADAPTERS / "lora_peft.safetensors", adapter_name="a")
            notes["active_after_loading_a"] = active(t)
            with g.use_converter(converter):
                pipe.load_lora_weights(SECOND, adapter_name="b")
            notes["active_after_loading_b"] = active(t)
            notes["scalings_before_set_adapters"] = scalings(t)
            pipe.set_adapters(["a", "b"], adapter_weights=[WEIGHT_A, WEIGHT_B])
        elif name == "moe_plus_peft":
            # g.install_moe: plain part of moe_lora through diffusers/PEFT (adapter "edit"), MoE
            # layers swapped in as g.MoELoRALinear around the bare nn.Linear. PEFT cannot wrap an
            # MoELoRALinear, so the bare Linear goes back in place while "b" is loaded, then the
            # MoE layer is put back around whatever PEFT left there (a lora.Linear holding "b" on
            # the single proj_out layers, the same bare Linear on double ff.net.2). Each MoE layer
            # then computes base(x) + MoE delta with base(x) = W x + bias + (b's LoRA delta).
            layers = g.install_moe(pipe, moe_sd, TOP_K)
            for m, layer in layers.items():
                parent, child = m.rsplit(".", 1)
                setattr(t.get_submodule(parent), child, layer.base)
            notes["active_after_loading_moe_plain_part"] = active(t)
            with g.use_converter(converter):
                pipe.load_lora_weights(SECOND, adapter_name="b")
            notes["active_after_loading_b"] = active(t)
            notes["scalings_before_set_adapters"] = scalings(t)
            for m, layer in layers.items():
                parent, child = m.rsplit(".", 1)
                inner = t.get_submodule(m)
                assert inner is layer.base or inner.get_base_layer() is layer.base, m
                layer.base = inner
                setattr(t.get_submodule(parent), child, layer)
            notes["moe_layers_over_lora_b"] = sorted(m for m, l in layers.items() if isinstance(l.base, LoraLayer))
            pipe.set_adapters(["edit", "b"], adapter_weights=[1.0, WEIGHT_B])
        else:
            raise ValueError(name)
    finally:
        g.release(handler)
    if handler.records:
        notes["diffusers_log"] = handler.records
    return pipe, layers, notes


RUN_SPECS = {
    "bare": [],
    "peft_a": [("a", "edit/adapters/lora_peft.safetensors", "peft", WEIGHT_A, g.ALPHA / g.RANK, None)],
    "moe": [("edit", "edit/adapters/moe_lora.safetensors", "moe", 1.0, g.ALPHA / g.RANK, TOP_K)],
    "second_kohya": [("b", "stacked/adapters/second_kohya.safetensors", "kohya", WEIGHT_B, ALPHA / RANK, None)],
}
RUN_SPECS["peft_plus_kohya"] = RUN_SPECS["peft_a"] + RUN_SPECS["second_kohya"]
RUN_SPECS["moe_plus_peft"] = RUN_SPECS["moe"] + RUN_SPECS["second_kohya"]
SINGLES = {"peft_plus_kohya": ["peft_a", "second_kohya"], "moe_plus_peft": ["moe", "second_kohya"]}
STORED = ["peft_plus_kohya", "moe_plus_peft", "second_kohya"]
ORDER = ["bare", "peft_a", "moe", "second_kohya", "peft_plus_kohya", "moe_plus_peft"]


def main():
    torch.set_num_threads(2)
    g.diffusers_logging.set_verbosity_warning()
    g.diffusers_logging.disable_progress_bar()
    g.transformers.logging.disable_progress_bar()
    for f in ("lora_peft.safetensors", "moe_lora.safetensors"):
        assert (g.ADAPTERS / f).exists(), f"run gen_edit_adapters.py first ({g.ADAPTERS / f})"
    if OUT.exists():
        shutil.rmtree(OUT)
    ADAPTERS.mkdir(parents=True)
    RUNS.mkdir(parents=True)

    base = g.fresh_pipe()
    cfg = base.transformer.config
    modules = second_modules(cfg)
    for m in modules:
        assert type(base.transformer.get_submodule(m)) is torch.nn.Linear, m
    second = make_second_lora(base.transformer, modules)
    del base
    kohya_sd = kohya_second(second, cfg)
    save_file(kohya_sd, SECOND)
    log(f"wrote {SECOND.relative_to(ROOT)} ({len(kohya_sd)} tensors)")
    peft_sd = load_file(g.ADAPTERS / "lora_peft.safetensors")
    moe_sd = load_file(g.ADAPTERS / "moe_lora.safetensors")

    # --- what diffusers' converter makes of the file -------------------------------------------
    converter_dims_only, converter_full = g.patched_kohya_converter(cfg)
    kohya_notes = {}
    handler = g.capture_diffusers_logs()
    try:
        g.fresh_pipe().load_lora_weights(SECOND, adapter_name="b")
        kohya_notes["stock_diffusers"] = "loaded"
    except AssertionError as e:
        tb = e.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        kohya_notes["stock_diffusers"] = (
            f"AssertionError in {tb.tb_frame.f_code.co_name} (lora_conversion_utils.py line {tb.tb_lineno}): "
            "hard-coded FLUX.1 linear1 dims [3072, 3072, 3072, 12288]"
        )
    finally:
        g.release(handler)
    with g.use_converter(converter_dims_only):
        conv = g.lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(SECOND)
    with g.use_converter(converter_full):
        conv_full = g.lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(SECOND)
    assert conv.keys() == conv_full.keys() and all(torch.equal(conv[k], conv_full[k]) for k in conv)
    converter = converter_dims_only  # no img_in in this file: only the linear1 dims need patching
    conv_modules = sorted({k.removeprefix("transformer.").split(".lora_")[0] for k in conv})
    assert all(k.startswith("transformer.") for k in conv)
    zero_b = []
    for m in conv_modules:
        a, b = conv[f"transformer.{m}.lora_A.weight"], conv[f"transformer.{m}.lora_B.weight"]
        assert a.shape[0] == RANK and b.shape[1] == RANK, (m, a.shape, b.shape)
        if m in second:
            want = second[m][1] @ second[m][0] * (ALPHA / RANK)
        else:
            want = torch.zeros(b.shape[0], a.shape[1])
            zero_b.append(m)
        assert torch.allclose(b @ a, want, atol=1e-6), m
    assert set(conv_modules) == set(second) | set(zero_b)
    kohya_notes["converted_modules"] = len(conv_modules)
    kohya_notes["converted_modules_with_all_zero_lora_B"] = zero_b
    kohya_notes["scale_baked_into_lora_A"] = ALPHA / RANK
    log(f"converter: {json.dumps(kohya_notes)}")

    # --- inputs (the edit fixtures' files) -----------------------------------------------------
    dip = Image.open(EDIT / "diptych.png").convert("RGB")
    mask = Image.open(EDIT / "mask.png")
    d2, m2 = g.diptych(g.source_image())
    assert np.array_equal(np.asarray(dip), np.asarray(d2)) and np.array_equal(np.asarray(mask), np.asarray(m2))
    edit_io = load_file(EDIT / "forward.safetensors")
    fx = g.forward_inputs()
    assert all(torch.equal(fx[k], edit_io[k]) for k in fx), "edit/forward.safetensors inputs changed"

    # Layers checked against the formula, with the adapters that touch them.
    probes = {
        "peft_plus_kohya": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_add_out",
                            "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out"],
        "moe_plus_peft": ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.net.2",
                          "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_mlp"],
    }

    images, outs, runs = {}, {}, {}
    forward = {}
    for name in ORDER:
        log(f"run {name}")
        pipe, layers, notes = setup(name, converter, moe_sd)
        t = pipe.transformer
        entry = {
            "name": name,
            "stored": name in STORED,
            "adapters": [
                {"adapter_name": n, "file": f"tests/fixtures/{f}", "kind": k, "adapter_weight": w,
                 "file_scale": s, "effective_scale": s * w, "top_k": tk}
                for n, f, k, w, s, tk in RUN_SPECS[name]
            ],
            "seed": SEED, "steps": g.STEPS, "guidance": g.GUIDANCE, "max_sequence_length": g.MAX_SEQ,
            "width": 2 * g.SRC_W, "height": g.SRC_H, "prompt": g.PROMPT,
        }
        # PEFT scalings: kohya files have alpha/rank baked into lora_A (diffusers loads them with
        # alpha = rank), so their PEFT scaling is the adapter weight alone.
        want = {n: [(1.0 if k == "kohya" else s) * w] for n, _, k, w, s, _ in RUN_SPECS[name]}
        sc = scalings(t)
        if RUN_SPECS[name]:
            assert sc == want, (name, sc, want)
        entry["peft_scaling_per_adapter"] = {k: v[0] for k, v in sc.items()}
        if "b" in sc:
            entry["lora_b_modules"] = lora_modules(t, "b")
        entry.update(notes)

        probe = Probe(t, probes[name]) if name in probes else None
        if layers:
            layers[g.MOE_PROBE].keep_io = True
        out = g.transformer_forward(pipe, fx)
        outs[name] = out
        forward[f"out_{name}"] = out.contiguous()
        if probe:
            probe.remove()
            errs = {}
            for m, (x, y) in probe.io.items():
                w_, b_ = base_linear(m)
                manual = F.linear(x, w_, b_)
                if name == "peft_plus_kohya" and f"transformer.{m}.lora_A.weight" in peft_sd:
                    manual = manual + lora_delta(x, peft_sd[f"transformer.{m}.lora_A.weight"],
                                                 peft_sd[f"transformer.{m}.lora_B.weight"], g.ALPHA / g.RANK * WEIGHT_A)
                if name == "moe_plus_peft":
                    if g.is_moe(m):
                        manual = manual + moe_delta(x, moe_sd, m, TOP_K)
                    else:
                        manual = manual + lora_delta(x, moe_sd[f"transformer.{m}.lora_A.weight"],
                                                     moe_sd[f"transformer.{m}.lora_B.weight"], g.ALPHA / g.RANK)
                if m in second:
                    manual = manual + lora_delta(x, *second[m], ALPHA / RANK * WEIGHT_B)
                errs[m] = float((manual - y).abs().max())
                assert errs[m] < 1e-4 * max(1.0, float(y.abs().max())), (name, m, errs[m])
            entry["layer_formula_max_abs_err"] = errs
        if layers:
            routing = {
                "counts": g.moe_counts(layers),
                "min_topk_margin": min(l.calls[0]["margin"] for l in layers.values()),
            }
            g.check_diversity(routing["counts"], f"forward {name}")
            entry["forward_moe_counts"] = routing["counts"]
            entry["forward_moe_min_topk_margin"] = routing["min_topk_margin"]
            layers[g.MOE_PROBE].keep_io = False
            for l in layers.values():
                l.calls.clear()

        img = g.pipeline_call(pipe, dip, mask, SEED, "pt")
        assert img.shape == (1, 3, g.SRC_H, 2 * g.SRC_W), img.shape
        if layers:
            entry["moe_first_call_counts"] = g.moe_counts(layers, call=0)
            entry["moe_all_calls_counts"] = g.moe_counts(layers)
            entry["moe_min_topk_margin"] = min(c["margin"] for l in layers.values() for c in l.calls)
            assert entry["moe_min_topk_margin"] > g.MIN_ROUTE_MARGIN, (name, entry["moe_min_topk_margin"])
            assert entry["forward_moe_min_topk_margin"] > g.MIN_ROUTE_MARGIN, name
            for l in layers.values():
                l.calls.clear()
        images[name] = img
        entry["saturated_fraction"] = float(((img <= 0) | (img >= 1)).float().mean())
        if name in STORED:
            pil = g.pipeline_call(pipe, dip, mask, SEED, "pil")[0]
            check = pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(img))[0]
            assert np.array_equal(np.asarray(pil), np.asarray(check)), f"{name}: pil and pt runs differ"
            folder = RUNS / name
            folder.mkdir()
            pil.crop((g.SRC_W, 0, 2 * g.SRC_W, g.SRC_H)).save(folder / "edit.png")
            save_file({"image": img.float().contiguous()}, folder / "image.safetensors")
        runs[name] = entry
        del pipe

    # --- differences ---------------------------------------------------------------------------
    def img_diff(a, b):
        return float((images[a] - images[b]).abs().max())

    def fwd_diff(a, b):
        return float((outs[a] - outs[b]).abs().max())

    bare_scale = float(outs["bare"].abs().max())
    for name, entry in runs.items():
        entry["image_max_abs_diff_vs_bare"] = img_diff(name, "bare")
        entry["image_mean_abs_diff_vs_bare"] = float((images[name] - images["bare"]).abs().mean())
        entry["forward_max_abs_diff_vs_bare"] = fwd_diff(name, "bare")
        if name != "bare":
            assert entry["image_max_abs_diff_vs_bare"] > 10 / 255, name
            assert entry["forward_max_abs_diff_vs_bare"] > 0.1 * bare_scale, name
        for single in SINGLES.get(name, []):
            entry[f"image_max_abs_diff_vs_{single}"] = img_diff(name, single)
            entry[f"forward_max_abs_diff_vs_{single}"] = fwd_diff(name, single)
            # both adapters matter: the stack differs clearly from each adapter alone
            assert entry[f"image_max_abs_diff_vs_{single}"] > 10 / 255, (name, single)
            assert entry[f"forward_max_abs_diff_vs_{single}"] > 0.1 * bare_scale, (name, single)
        assert entry["saturated_fraction"] < 0.5, (name, entry["saturated_fraction"])

    # Cross-checks against the single-adapter fixtures of tests/fixtures/edit.
    cross = {}
    for name, edit_run in (("bare", "bare"), ("moe", "moe")):
        stored = load_file(EDIT / "runs" / edit_run / "image.safetensors")["image"]
        cross[f"{name}_image_vs_edit_runs_{edit_run}"] = float((images[name] - stored).abs().max())
        cross[f"{name}_forward_vs_edit_forward_out_{edit_run}"] = float((outs[name] - edit_io[f"out_{edit_run}"]).abs().max())
    for k, v in cross.items():
        assert v < 1e-4, (k, v)

    save_file({k: forward[k] for k in sorted(forward) if k != "out_bare"}, OUT / "forward.safetensors")

    versions = {
        "torch": torch.__version__, "diffusers": g.diffusers.__version__,
        "transformers": g.transformers.__version__, "peft": g.peft.__version__,
        "safetensors": g.safetensors.__version__, "numpy": np.__version__,
    }
    (OUT / "runs.json").write_text(json.dumps({
        "versions": versions,
        "torch_threads": 2,
        "prompt": g.PROMPT,
        "inputs": {"diptych": "tests/fixtures/edit/diptych.png", "mask": "tests/fixtures/edit/mask.png",
                   "forward": "tests/fixtures/edit/forward.safetensors"},
        "second_kohya": {
            "rank": RANK, "alpha_per_rank": ALPHA / RANK, "seed": SECOND_SEED,
            "targets": sorted(second),
            "keys": {k: list(v.shape) for k, v in sorted(kohya_sd.items())},
            "alphas": {k: float(v) for k, v in sorted(kohya_sd.items()) if k.endswith(".alpha")},
            "diffusers_conversion": kohya_notes,
        },
        "cross_checks_vs_edit_fixtures": cross,
        "runs": [runs[n] for n in ORDER],
    }, indent=1))
    write_readme(runs, kohya_sd, kohya_notes)

    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    assert total < 1e6, total
    log("\nmax-abs differences (pipeline image / transformer forward):")
    for name in ORDER:
        e = runs[name]
        extra = "".join(f"  vs {s}: {e[f'image_max_abs_diff_vs_{s}']:.4f} / {e[f'forward_max_abs_diff_vs_{s}']:.3f}"
                        for s in SINGLES.get(name, []))
        log(f"  {name:16s} vs bare: {e['image_max_abs_diff_vs_bare']:.4f} / {e['forward_max_abs_diff_vs_bare']:.3f}{extra}")
    log(f"cross-checks: {json.dumps(cross)}")
    log("wrote:")
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            log(f"  {f.relative_to(ROOT)}  {f.stat().st_size} bytes")
    log(f"total {total / 1e6:.3f} MB")


def write_readme(runs, kohya_sd, kohya_notes):
    key_lines = "\n".join(f"  {k}  {list(v.shape)}" + (f" = {float(v):g}" if k.endswith(".alpha") else "")
                          for k, v in sorted(kohya_sd.items()))

    def diffs(name):
        e = runs[name]
        parts = [f"bare {e['image_max_abs_diff_vs_bare']:.3f} / {e['forward_max_abs_diff_vs_bare']:.2f}"]
        parts += [f"{s} {e[f'image_max_abs_diff_vs_{s}']:.3f} / {e[f'forward_max_abs_diff_vs_{s}']:.2f}"
                  for s in SINGLES.get(name, [])]
        return "; ".join(parts)

    text = f"""# Stacked adapter fixtures

Two adapters active at once on the tiny FLUX.1 Fill pipeline `tests/fixtures/fill_pipeline/tiny`,
made by `tests/reference/gen_stacked_adapters.py`, which imports `gen_edit_adapters.py` and reuses
its adapters, inputs, MoE reference and kohya converter patch (`tests/fixtures/edit` must exist).
Regenerate (deterministic, CPU, f32, 2 torch threads) from the repo root with

    .venv-ref/bin/python tests/reference/gen_stacked_adapters.py

## `adapters/second_kohya.safetensors`
A second plain LoRA, rank 4, alpha 8 (alpha/rank = 2), values from seed {SECOND_SEED}
(A ~ N(0, 1/sqrt(in)), B ~ N(0, {B_GAIN * g.B_STD:g})), in sd-scripts / BFL naming with `.alpha` scalars, no
metadata. Targets (diffusers names): double `attn.to_q/k/v`, `attn.to_out.0`, `attn.to_add_out`;
single `proj_mlp`, `proj_out`. All but `to_add_out` are also targets of `lora_peft` / `moe_lora`
(two adapters on one layer); `to_add_out` (text stream) is this file's alone; single `proj_out`
is an MoE layer of `moe_lora`.
- `double_blocks_0_img_attn_qkv`: q, k, v LoRAs fused as `kohya_from_peft` does: lora_down = the
  A's stacked by rows [12, 32], lora_up = block diagonal of the B's [96, 12], alpha 24 (24/12 = 2).
  diffusers' converter sees a block-diagonal ("sparse") up and splits it back into three rank-4 LoRAs.
- `single_blocks_<i>_linear1`: proj_mlp only: lora_down = A_mlp [4, 32], lora_up [224, 4] with
  B_mlp in rows 96..224 and zeros in the q, k, v rows, alpha 8. Not block diagonal, so diffusers
  shares lora_down across the four parts: to_q/k/v get LoRAs with all-zero lora_B (no effect).
- `double_blocks_0_img_attn_proj` (to_out.0), `double_blocks_0_txt_attn_proj` (to_add_out),
  `single_blocks_<i>_linear2` (proj_out): plain, alpha 8.

```
{key_lines}
```

Loading: stock diffusers 0.42.1 fails on this model ({kohya_notes['stock_diffusers']}); the
script loads it through diffusers' own `_convert_kohya_flux_lora_to_diffusers` with only the
`linear1` split sizes patched (`gen_edit_adapters.patched_kohya_converter`; the file has no
`img_in`, so the second patch does not matter, asserted). The converter multiplies lora_down by
alpha/rank = 2 and diffusers then loads the result with alpha = rank (PEFT scaling 1).

## Scale semantics
Per adapter: delta = adapter_weight * (alpha / rank) * B A x, added to the layer's output.
- PEFT file `lora_peft` (metadata lora_alpha 8, r 4): PEFT scaling = 2 * weight.
- kohya file `second_kohya`: alpha/rank (2) baked into lora_A by the converter, PEFT scaling =
  weight; same effective delta 2 * weight * B A x.
- `set_adapters(names, adapter_weights)` sets each adapter's scaling to weight * lora_alpha / r
  (asserted for every LoRA layer); the deltas of different adapters on one layer simply add.

## Runs (`runs/<name>/`, parameters and differences in `runs.json`)
Whole `FluxFillPipeline` edits exactly like `tests/fixtures/edit`: prompt `{g.PROMPT}`,
`image=tests/fixtures/edit/diptych.png`, `mask_image=tests/fixtures/edit/mask.png`, height 48,
width 128, {g.STEPS} steps, guidance {g.GUIDANCE}, max_sequence_length {g.MAX_SEQ},
`generator=Generator("cpu").manual_seed({SEED})`, f32, pipeline rebuilt from disk per run.
Files: `edit.png` (right half of the output_type "pil" diptych) and `image.safetensors`
(`image` [1,3,48,128] in [0,1], output_type "pt", the whole diptych).
- `peft_plus_kohya`: `pipe.load_lora_weights(edit/adapters/lora_peft.safetensors, adapter_name="a")`,
  `pipe.load_lora_weights(second_kohya.safetensors, adapter_name="b")`,
  `pipe.set_adapters(["a", "b"], adapter_weights=[{WEIGHT_A}, {WEIGHT_B}])`:
  effective scales a = {WEIGHT_A} * 2 = {WEIGHT_A * 2:g}, b = {WEIGHT_B} * 2 = {WEIGHT_B * 2:g}.
- `moe_plus_peft`: `edit/adapters/moe_lora.safetensors` through `gen_edit_adapters.install_moe`
  (top_k {TOP_K}, weight 1: plain part via diffusers/PEFT as adapter "edit", scale 2; MoE layers
  double `ff.net.2` and single `proj_out` replaced by the Python `MoELoRALinear`), plus
  `second_kohya.safetensors` loaded through diffusers/PEFT as adapter "b", then
  `set_adapters(["edit", "b"], adapter_weights=[1.0, {WEIGHT_B}])`. PEFT cannot wrap an
  `MoELoRALinear`, so the script puts the bare `nn.Linear` back while "b" loads and then wraps the
  MoE layer around what PEFT left there. On single `proj_out` (MoE and "b"):
  y = W x + bias + {WEIGHT_B} * 2 * B_b A_b x + sum_e w_e(x) * 2 * B_e A_e x, the router seeing the
  layer's input x (so "b" moves the routing only through the layers before it). Elsewhere the
  plain parts of both adapters add as in `peft_plus_kohya`.
- `second_kohya`: `second_kohya.safetensors` alone at weight {WEIGHT_B} (effective scale {WEIGHT_B * 2:g}),
  to check the file by itself.

Not stored (the differences below use them): `bare` and `moe` (equal to
`tests/fixtures/edit/runs/{{bare,moe}}`, see `cross_checks_vs_edit_fixtures`) and `peft_a`
(`lora_peft` alone at weight {WEIGHT_A}).

Max-abs differences, pipeline image / transformer forward:
- `peft_plus_kohya` vs {diffs('peft_plus_kohya')}
- `moe_plus_peft` vs {diffs('moe_plus_peft')}
- `second_kohya` vs {diffs('second_kohya')}

## `forward.safetensors`
One transformer forward with the inputs of `tests/fixtures/edit/forward.safetensors` (its
`out_bare` is the bare output): `out_peft_plus_kohya`, `out_moe_plus_peft`, `out_second_kohya`,
and the single setups `out_peft_a`, `out_moe` [1,48,64]. For a few layers per stacked forward the
script checks the layer output against the formula above written out from the files
(`layer_formula_max_abs_err` in `runs.json`). MoE expert counts and the smallest top-k logit gap
(> {g.MIN_ROUTE_MARGIN}, asserted) are in `runs.json`.

## Notes on diffusers 0.42.1 / peft 0.21.2 when stacking
- `load_lora_weights(..., adapter_name="b")` on a transformer that already has adapter "a"
  makes "b" the only active adapter ("a" stays loaded but inactive: `active_after_loading_b` in
  `runs.json`); both act only after `set_adapters(["a", "b"], ...)`.
- Loading the second adapter logs a spurious warning "Loading adapter weights from state_dict
  led to missing keys in the model" listing every key of the FIRST adapter (`diffusers_log`);
  nothing is missing.
- `set_adapters` weights multiply PEFT's per-adapter scaling alpha/r: "a" 2 -> {WEIGHT_A * 2:g},
  "b" 1 -> {WEIGHT_B:g} (its alpha/rank 2 already sits in lora_A). Before `set_adapters` the
  scalings are 2 and 1, i.e. each file at weight 1.
- The kohya converter handles the second file like the first: block-diagonal qkv split back
  into rank-4 LoRAs ("weight is sparse" log line), the partial `linear1` taken as dense (zero
  lora_B on single to_q/k/v, see `second_kohya.diffusers_conversion` in `runs.json`). Only its
  hard-coded FLUX.1 `linear1` sizes had to be patched, as for `lora_kohya`.
- In `moe_plus_peft` the "b" LoRA of single `proj_out` lives at `...proj_out.base` (inside the
  MoE layer), hence those names in `lora_b_modules`.
- These fixtures use 2 torch threads, the edit fixtures 1: the recomputed `bare` and `moe` differ
  from `tests/fixtures/edit` by about 1e-5 (`cross_checks_vs_edit_fixtures`), not bitwise.
"""
    (OUT / "README.md").write_text(text)


if __name__ == "__main__":
    main()
