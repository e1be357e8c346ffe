"""Fixtures for step caches on the FLUX pipelines: diffusers' First Block Cache and TaylorSeer.

Runs the tiny pipelines of tests/fixtures/fill_pipeline/tiny (FluxFillPipeline) and
tests/fixtures/kontext/tiny (FluxKontextPipeline) with `transformer.enable_cache(config)` and
records, per run, the output, the final latents, every transformer output, and which transformer
evaluations were computed in full (per cache context, in order), so that a port can check both the
decisions and the numbers.

tests/fixtures/step_cache/
  README.md
  reference/
    runs.json                 parameters, cache configs, computed lists, FBC diffs, checks, versions
    <run>/image.png, [mask.png], out.png, io.safetensors

diffusers 0.42.1's FluxFillPipeline and FluxKontextPipeline call the transformer without
`transformer.cache_context(...)`, and every stateful cache hook then raises "No cache context is
set". This script does what diffusers' own FluxPipeline does: each transformer call is wrapped in
`with transformer.cache_context("cond")`, and with true CFG (Kontext) the second call of each step
(the negative prompt) in `cache_context("uncond")`. It is done by replacing `transformer.forward`
with a counter-based wrapper for the duration of a pipeline call.

Run (from the repo root, in the reference venv; deterministic, CPU, 2 threads):
  .venv-ref/bin/python tests/reference/gen_step_cache.py
"""

import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_fill_pipeline as fill  # noqa: E402

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import FluxFillPipeline, FluxKontextPipeline  # noqa: E402
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig  # noqa: E402
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK  # noqa: E402
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "step_cache"
REF = OUT / "reference"
FILL_TINY = ROOT / "tests" / "fixtures" / "fill_pipeline" / "tiny"
KONTEXT_TINY = ROOT / "tests" / "fixtures" / "kontext" / "tiny"
KONTEXT_PHOTO = ROOT / "tests" / "fixtures" / "kontext" / "reference" / "true_cfg" / "image.png"

# Thresholds tried for the FBC runs, in this order; the choice is made by rule (see pick_fbc).
FBC_CANDIDATES = [0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0]
MIN_MARGIN = 0.02  # a chosen threshold is at least 2 % (relative) away from every recorded diff

FILL = dict(prompt="make it night", seed=11, guidance=30.0, max_sequence_length=16, height=64, width=32,
            mask_box=[0, 0, 32, 32], photo_seed=2)
KONTEXT = dict(prompt="make it night", negative_prompt="blurry", true_cfg_scale=2.0, seed=13, steps=8,
               guidance=2.5, max_sequence_length=16, height=64, width=32, max_area=2048, auto_resize=False)


# ---------------------------------------------------------------------------------------------
# Cache contexts and recording


class Recorder:
    """Replaces `transformer.forward` for one pipeline call: call k runs inside
    `cache_context(names[k % len(names)])` (step k // len(names)), and after each call (still inside
    the context) records what the cache hooks decided, plus the call's output."""

    def __init__(self, pipe, names):
        self.t = pipe.transformer
        self.names = names
        self.count = 0
        self.outputs = {n: [] for n in names}
        self.first_hidden = None
        self.fbc = {n: {"computed": [], "diffs": [], "tail_attn_calls": []} for n in names}
        self.ts = {n: {} for n in names}  # context -> module -> [computed per call]
        self.ts_attn_calls = {n: [] for n in names}
        self.attn_outputs = {}  # module name -> output description (from the first computed call)
        self._current = None
        self._handles = []
        self._patched = []
        self._tail_calls = 0
        self._ts_calls = 0

        cfg = self.t._cache_config
        self.kind = None
        if isinstance(cfg, FirstBlockCacheConfig):
            self.kind = "fbc"
            head = self.t.transformer_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
            assert head is not None
            self.fbc_head = head
            self.fbc_threshold = cfg.threshold
            orig = head._should_compute_remaining_blocks

            def should_compute(residual, _orig=orig, _head=head):
                # The same arithmetic as FBCHeadBlockHook._should_compute_remaining_blocks, to record
                # the diff; the hook's own answer is what counts (and must agree).
                state = _head.state_manager.get_state()
                if state.head_block_residual is None:
                    diff = None
                else:
                    prev = state.head_block_residual
                    diff = ((residual - prev).abs().mean() / prev.abs().mean()).item()
                result = _orig(residual)
                assert result == (True if diff is None else diff > _head.threshold), (diff, result)
                self.fbc[self._current]["diffs"].append(diff)
                return result

            head._should_compute_remaining_blocks = should_compute
            self._patched.append((head, "_should_compute_remaining_blocks"))
            # The tail block's attention runs only when the remaining blocks are computed.
            tail = self.t.single_transformer_blocks[-1]
            assert tail._diffusers_hook.get_hook(_FBC_BLOCK_HOOK).is_tail
            self._handles.append(tail.attn.register_forward_hook(self._count_tail))
        elif isinstance(cfg, TaylorSeerCacheConfig):
            self.kind = "taylorseer"
            self.ts_hooked = hooked_modules(self.t)
            for name in self.ts_hooked:
                module = self.t.get_submodule(name)
                hook = module._diffusers_hook.get_hook(_TAYLORSEER_CACHE_HOOK)
                orig = hook._measure_should_compute

                def measure(_orig=orig, _name=name):
                    should, state = _orig()
                    self.ts[self._current].setdefault(_name, []).append(
                        {"step": state.current_step, "computed": bool(should)}
                    )
                    return should, state

                hook._measure_should_compute = measure
                self._patched.append((hook, "_measure_should_compute"))
                self._handles.append(module.register_forward_hook(self._describe(name)))
                # to_q is inside the attention module: it runs only if the module really computed.
                self._handles.append(module.to_q.register_forward_hook(self._count_ts))
        assert "forward" not in vars(self.t)
        self._orig_forward = self.t.forward
        self.t.forward = self._forward

    def _count_tail(self, *_):
        self._tail_calls += 1

    def _count_ts(self, *_):
        self._ts_calls += 1

    def _describe(self, name):
        def hook(module, args, output):
            if name in self.attn_outputs:
                return
            if isinstance(output, tuple):
                self.attn_outputs[name] = {"type": "tuple", "shapes": [list(o.shape) for o in output],
                                           "dtypes": [str(o.dtype) for o in output]}
            else:
                self.attn_outputs[name] = {"type": "tensor", "shapes": [list(output.shape)],
                                           "dtypes": [str(output.dtype)]}

        return hook

    def _forward(self, *args, **kwargs):
        name = self.names[self.count % len(self.names)]
        self.count += 1
        if self.first_hidden is None:
            self.first_hidden = kwargs["hidden_states"].detach().clone()
        self._current = name
        self._tail_calls = 0
        self._ts_calls = 0
        with self.t.cache_context(name):
            out = self._orig_forward(*args, **kwargs)
            if self.kind == "fbc":
                state = self.fbc_head.state_manager.get_state()
                self.fbc[name]["computed"].append(bool(state.should_compute))
                self.fbc[name]["tail_attn_calls"].append(self._tail_calls)
                assert self._tail_calls == (1 if state.should_compute else 0)
            elif self.kind == "taylorseer":
                self.ts_attn_calls[name].append(self._ts_calls)
        self._current = None
        self.outputs[name].append(out[0].detach().clone())
        return out

    def close(self):
        del self.t.forward  # back to the class method
        for h in self._handles:
            h.remove()
        for obj, attr in self._patched:
            delattr(obj, attr)

    def computed(self):
        """{context: [computed per step]} and for TaylorSeer checks that all hooked modules agree."""
        if self.kind == "fbc":
            return {n: self.fbc[n]["computed"] for n in self.names}
        if self.kind == "taylorseer":
            result = {}
            for n in self.names:
                per_module = self.ts[n]
                assert set(per_module) == set(self.ts_hooked), (set(per_module), self.ts_hooked)
                lists = {m: [e["computed"] for e in v] for m, v in per_module.items()}
                steps = {m: [e["step"] for e in v] for m, v in per_module.items()}
                first = lists[self.ts_hooked[0]]
                assert all(v == first for v in lists.values()), "hooked modules disagree"
                assert all(s == list(range(len(first))) for s in steps.values()), steps
                n_hooked = len(self.ts_hooked)
                assert self.ts_attn_calls[n] == [n_hooked if c else 0 for c in first], self.ts_attn_calls[n]
                result[n] = first
            return result
        return None


def hooked_modules(transformer):
    return [
        name
        for name, m in transformer.named_modules()
        if hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook(_TAYLORSEER_CACHE_HOOK) is not None
    ]


def assert_reset(transformer):
    """After a pipeline call (maybe_free_model_hooks -> _reset_stateful_cache) no hook holds state."""
    n = 0
    for _, m in transformer.named_modules():
        if not hasattr(m, "_diffusers_hook"):
            continue
        for hook in m._diffusers_hook.hooks.values():
            sm = getattr(hook, "state_manager", None)
            if sm is not None:
                assert sm._state_cache == {} and sm._context is None, type(hook)
                n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Runs


def call_pipe(pipe, kwargs, seed, output_type, names):
    rec = Recorder(pipe, names)
    try:
        with torch.no_grad():
            images = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed),
                          output_type=output_type).images
    finally:
        rec.close()
    assert rec.count == len(names) * kwargs["num_inference_steps"], rec.count
    if pipe.transformer.is_cache_enabled:
        assert assert_reset(pipe.transformer) > 0
    return images, rec


def set_cache(pipe, config):
    if pipe.transformer.is_cache_enabled:
        pipe.transformer.disable_cache()
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks
                   for _, m in pipe.transformer.named_modules())
    if config is not None:
        pipe.transformer.enable_cache(config)


def fill_kwargs(pipe, steps):
    image = fill.test_image(FILL["height"], FILL["width"], FILL["photo_seed"])
    mask = fill.rect_mask(FILL["height"], FILL["width"], tuple(FILL["mask_box"]))
    kwargs = dict(prompt=FILL["prompt"], image=image, mask_image=mask, height=FILL["height"],
                  width=FILL["width"], num_inference_steps=steps, guidance_scale=FILL["guidance"],
                  max_sequence_length=FILL["max_sequence_length"])
    return kwargs, image, mask


def kontext_kwargs():
    photo = Image.open(KONTEXT_PHOTO).convert("RGB")
    kwargs = dict(image=photo, prompt=KONTEXT["prompt"], negative_prompt=KONTEXT["negative_prompt"],
                  true_cfg_scale=KONTEXT["true_cfg_scale"], height=KONTEXT["height"], width=KONTEXT["width"],
                  max_area=KONTEXT["max_area"], _auto_resize=KONTEXT["auto_resize"],
                  num_inference_steps=KONTEXT["steps"], guidance_scale=KONTEXT["guidance"],
                  max_sequence_length=KONTEXT["max_sequence_length"])
    return kwargs, photo


def config_json(config):
    if config is None:
        return None
    if isinstance(config, FirstBlockCacheConfig):
        return {"kind": "first_block_cache", "threshold": config.threshold}
    return {
        "kind": "taylorseer",
        "cache_interval": config.cache_interval,
        "disable_cache_before_step": config.disable_cache_before_step,
        "disable_cache_after_step": config.disable_cache_after_step,
        "max_order": config.max_order,
        "taylor_factors_dtype": str(config.taylor_factors_dtype).replace("torch.", ""),
        "skip_predict_identifiers": config.skip_predict_identifiers,
        "cache_identifiers": config.cache_identifiers,
        "use_lite_mode": config.use_lite_mode,
    }


def margin(diffs, threshold):
    ds = [d for ctx in diffs.values() for d in ctx if d is not None]
    if threshold == 0.0:
        return None
    return min(abs(d - threshold) / threshold for d in ds)


def execute(pipe, kwargs, seed, names, config):
    """Runs np and latent outputs with the cache config; returns everything to record."""
    set_cache(pipe, config)
    image, rec_np = call_pipe(pipe, kwargs, seed, "np", names)
    latents, rec_lat = call_pipe(pipe, kwargs, seed, "latent", names)
    computed = rec_np.computed()
    assert computed == rec_lat.computed(), "the two calls of a run decided differently (state not reset?)"
    for n in names:
        for a, b in zip(rec_np.outputs[n], rec_lat.outputs[n]):
            assert torch.equal(a, b)
    result = {
        "image": image[0],
        "latents": latents.float(),
        "rec": rec_np,
        "computed": computed,
    }
    if rec_np.kind == "fbc":
        result["diffs"] = {n: rec_np.fbc[n]["diffs"] for n in names}
        assert result["diffs"] == {n: rec_lat.fbc[n]["diffs"] for n in names}
    return result


def pick_fbc(pipe, kwargs, seed, names, steps):
    """Tries FBC_CANDIDATES; returns the table of (threshold, computed, diffs, margin)."""
    table = []
    set_cache(pipe, None)
    for thr in FBC_CANDIDATES:
        set_cache(pipe, FirstBlockCacheConfig(threshold=thr))
        _, rec = call_pipe(pipe, kwargs, seed, "latent", names)
        computed = rec.computed()
        diffs = {n: rec.fbc[n]["diffs"] for n in names}
        skipped = {n: sum(not c for c in computed[n]) for n in names}
        table.append({"threshold": thr, "computed": computed, "skipped": skipped,
                      "margin": margin(diffs, thr)})
    set_cache(pipe, None)
    return table


def save_run(name, spec, res, image=None, mask=None, given=None, extra_io=None):
    folder = REF / name
    folder.mkdir()
    if image is not None:
        image.save(folder / "image.png")
    if mask is not None:
        mask.save(folder / "mask.png")
    img = res["image"]
    Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / "out.png")
    rec = res["rec"]
    tensors = {
        "image": torch.from_numpy(np.ascontiguousarray(img)).float(),
        "final_latents": res["latents"].contiguous(),
    }
    # The packed start latents, from the first transformer call: Fill concatenates
    # [latents, masked image latents, mask] on channels (latents = the first 64), Kontext
    # [latents, photo latents] on tokens (latents = the first N = output tokens).
    if spec["pipeline"] == "fill":
        tensors["initial_latents"] = rec.first_hidden[..., :64].contiguous()
    else:
        tensors["initial_latents"] = rec.first_hidden[:, : res["latents"].shape[1]].contiguous()
    for n in rec.names:
        tensors[f"{n}_outputs"] = torch.cat(rec.outputs[n], 0).float().contiguous()
    if extra_io:
        tensors.update(extra_io)
    save_file(tensors, folder / "io.safetensors")
    entry = dict(spec)
    entry["name"] = name
    entry["computed"] = res["computed"]
    if "diffs" in res:
        entry["diffs"] = res["diffs"]
    if rec.kind == "taylorseer":
        entry["hooked_modules"] = rec.ts_hooked
        entry["hooked_module_outputs"] = rec.attn_outputs
    return entry


def main():
    torch.set_num_threads(2)
    if OUT.exists():
        shutil.rmtree(OUT)
    REF.mkdir(parents=True)
    runs = []
    checks = {}
    exploration = {}

    # ---------------------------------------------------------------- Fill
    pipe = FluxFillPipeline.from_pretrained(FILL_TINY, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    names = ["cond"]
    base_spec = {"pipeline": "fill", "prompt": FILL["prompt"], "seed": FILL["seed"],
                 "guidance": FILL["guidance"], "max_sequence_length": FILL["max_sequence_length"],
                 "height": FILL["height"], "width": FILL["width"], "mask_box_tlbr": FILL["mask_box"],
                 "image": f"fill_pipeline test_image(64, 32, {FILL['photo_seed']})",
                 "given_latents": False, "dtype": "float32", "contexts": names}

    def fill_run(name, steps, config, baseline=None):
        kwargs, image, mask = fill_kwargs(pipe, steps)
        res = execute(pipe, kwargs, FILL["seed"], names, config)
        spec = dict(base_spec, steps=steps, cache=config_json(config))
        entry = save_run(name, spec, res, image=image, mask=mask)
        if baseline is not None:
            entry["vs_nocache_image_max_abs"] = float(np.abs(res["image"] - baseline["image"]).max())
            entry["vs_nocache_latents_max_abs"] = float((res["latents"] - baseline["latents"]).abs().max())
        runs.append(entry)
        return res, entry

    base8, _ = fill_run("fill_nocache", 8, None)
    res0, e0 = fill_run("fill_fbc_0", 8, FirstBlockCacheConfig(threshold=0.0), base8)
    assert np.array_equal(res0["image"], base8["image"]) and torch.equal(res0["latents"], base8["latents"])
    assert all(e0["computed"]["cond"])
    checks["fill_fbc_0_equals_nocache"] = True

    kwargs, _, _ = fill_kwargs(pipe, 8)
    table = pick_fbc(pipe, kwargs, FILL["seed"], names, 8)
    exploration["fill_fbc"] = table
    # (a): the smallest threshold skipping at least one step but at most a third of the skippable
    # ones; (b): the smallest threshold skipping more than (a) (a different pattern) but not all.
    # Both must keep MIN_MARGIN to every recorded diff.
    ok = [r for r in table if r["margin"] is not None and r["margin"] >= MIN_MARGIN]
    a = next(r for r in ok if 1 <= r["skipped"]["cond"] <= 7 // 3 + 1)
    b = next(r for r in ok if a["skipped"]["cond"] < r["skipped"]["cond"] < 7)
    for label, r in (("a", a), ("b", b)):
        res, entry = fill_run(f"fill_fbc_{label}", 8, FirstBlockCacheConfig(threshold=r["threshold"]), base8)
        assert entry["computed"] == r["computed"]
        entry["threshold_margin"] = margin(entry["diffs"], r["threshold"])
        assert entry["threshold_margin"] >= MIN_MARGIN

    for name, steps, config in [
        ("fill_taylor_bf16factors", 12, TaylorSeerCacheConfig()),
        ("fill_taylor_f32_order2", 10, TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2,
                                                             max_order=2, taylor_factors_dtype=torch.float32)),
    ]:
        set_cache(pipe, None)
        kwargs, _, _ = fill_kwargs(pipe, steps)
        baseline = execute(pipe, kwargs, FILL["seed"], names, None)
        res, entry = fill_run(name, steps, config, baseline)
        expected = [taylor_should_compute(s, config) for s in range(steps)]
        assert entry["computed"]["cond"] == expected, (entry["computed"], expected)
        entry["nocache_final_latents_in_io"] = "nocache_final_latents"
        # The uncached run with the same step count, for comparison (not a separate run folder).
        extra = {"nocache_final_latents": baseline["latents"].contiguous(),
                 "nocache_image": torch.from_numpy(np.ascontiguousarray(baseline["image"])).float()}
        append_io(REF / name / "io.safetensors", extra)
        verify_taylor_predictions(pipe, kwargs, config, names)
    set_cache(pipe, None)
    del pipe

    # ---------------------------------------------------------------- Kontext, true CFG
    pipe = FluxKontextPipeline.from_pretrained(KONTEXT_TINY, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    names = ["cond", "uncond"]
    kwargs, photo = kontext_kwargs()
    base = execute(pipe, kwargs, KONTEXT["seed"], names, None)
    table = pick_fbc(pipe, kwargs, KONTEXT["seed"], names, KONTEXT["steps"])
    exploration["kontext_truecfg_fbc"] = table
    ok = [r for r in table if r["margin"] is not None and r["margin"] >= MIN_MARGIN]
    # Both contexts skip at least one step, neither skips all skippable steps; else any skipping.
    both = [r for r in ok if all(1 <= r["skipped"][n] < KONTEXT["steps"] - 1 for n in names)]
    some = [r for r in ok if 1 <= sum(r["skipped"].values())]
    pick = (both or some)[0]
    config = FirstBlockCacheConfig(threshold=pick["threshold"])
    res = execute(pipe, kwargs, KONTEXT["seed"], names, config)
    spec = {"pipeline": "kontext", "prompt": KONTEXT["prompt"], "negative_prompt": KONTEXT["negative_prompt"],
            "true_cfg_scale": KONTEXT["true_cfg_scale"], "seed": KONTEXT["seed"], "steps": KONTEXT["steps"],
            "guidance": KONTEXT["guidance"], "max_sequence_length": KONTEXT["max_sequence_length"],
            "height": KONTEXT["height"], "width": KONTEXT["width"], "max_area": KONTEXT["max_area"],
            "auto_resize": KONTEXT["auto_resize"], "photo": "kontext/reference/true_cfg/image.png (32x64)",
            "given_latents": False, "dtype": "float32", "contexts": names, "cache": config_json(config)}
    extra = {"nocache_final_latents": base["latents"].contiguous(),
             "nocache_image": torch.from_numpy(np.ascontiguousarray(base["image"])).float()}
    entry = save_run("kontext_truecfg_fbc", spec, res, extra_io=extra)
    shutil.copyfile(KONTEXT_PHOTO, REF / "kontext_truecfg_fbc" / "image.png")  # byte for byte
    assert entry["computed"] == pick["computed"]
    entry["threshold_margin"] = margin(entry["diffs"], pick["threshold"])
    entry["vs_nocache_image_max_abs"] = float(np.abs(res["image"] - base["image"]).max())
    entry["vs_nocache_latents_max_abs"] = float((res["latents"] - base["latents"]).abs().max())
    runs.append(entry)
    set_cache(pipe, None)

    (REF / "runs.json").write_text(json.dumps({
        "versions": {
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__, "PIL": PIL.__version__,
        },
        "context_wrapper": "transformer.forward replaced for each pipeline call: call k runs in "
                           "transformer.cache_context(contexts[k % len(contexts)]) (step k // len(contexts)); "
                           "Fill: ['cond'], Kontext true CFG: ['cond', 'uncond'] (positive, then negative).",
        "checks": checks,
        "fbc_threshold_exploration": exploration,
        "runs": runs,
    }, indent=1))

    print_summary(runs, exploration)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.3f} MB)")
    assert total < 1e6


def taylor_should_compute(step, config):
    warm = step < config.disable_cache_before_step
    interval = (step - config.disable_cache_before_step - 1) % config.cache_interval == 0
    cool = config.disable_cache_after_step is not None and step >= config.disable_cache_after_step
    return warm or interval or cool


def verify_taylor_predictions(pipe, kwargs, config, names):
    """Re-runs with the cache and checks every predicted attention output against an independent
    reimplementation of TaylorSeerState.update / predict (dtype casts included), bit for bit."""
    set_cache(pipe, config)
    t = pipe.transformer
    shadow = {}
    handles = []
    checked = [0]
    steps = {}

    def make(name):
        def hook(module, args, output):
            outs = (output,) if isinstance(output, torch.Tensor) else tuple(output)
            step = steps[name] = steps.get(name, -1) + 1
            st = shadow.setdefault(name, {"last": None, "factors": None})
            if taylor_should_compute(step, config):
                new_all = []
                for i, f in enumerate(outs):
                    new = [f]
                    if st["last"] is not None:
                        d = step - st["last"]
                        prev = st["factors"][i]
                        for j in range(config.max_order):
                            if j >= len(prev):
                                break
                            new.append((new[j] - prev[j].to(f.dtype)) / d)
                    new_all.append([x.to(config.taylor_factors_dtype) for x in new])
                st["factors"] = new_all
                st["last"] = step
            else:
                off = step - st["last"]
                for i, f in enumerate(outs):
                    exp = torch.zeros_like(st["factors"][i][0], dtype=f.dtype)
                    for k, fk in enumerate(st["factors"][i]):
                        exp = exp + fk.to(f.dtype) * ((off**k) / math.factorial(k))
                    assert torch.equal(exp, f), name
                    checked[0] += 1

        return hook

    for name in hooked_modules(t):
        handles.append(t.get_submodule(name).register_forward_hook(make(name)))
    try:
        call_pipe(pipe, kwargs, FILL["seed"], "latent", names)
    finally:
        for h in handles:
            h.remove()
    assert checked[0] > 0
    set_cache(pipe, None)


def append_io(path, extra):
    from safetensors.torch import load_file

    tensors = load_file(path)
    tensors.update(extra)
    save_file(tensors, path)


def fmt(bools):
    return "".join("C" if b else "." for b in bools)


def print_summary(runs, exploration):
    for key, table in exploration.items():
        print(f"FBC thresholds tried ({key}):")
        for r in table:
            m = "-" if r["margin"] is None else f"{r['margin']:.3f}"
            pats = " ".join(f"{n}={fmt(v)}" for n, v in r["computed"].items())
            print(f"  {r['threshold']:<5} {pats}  margin {m}")
    for e in runs:
        cache = e["cache"]
        desc = "none" if cache is None else " ".join(f"{k}={v}" for k, v in cache.items() if v is not None)
        pats = " ".join(f"{n}={fmt(v)}" for n, v in (e["computed"] or {}).items())
        extra = ""
        if "vs_nocache_image_max_abs" in e:
            extra = f"  |img - nocache| {e['vs_nocache_image_max_abs']:.4f}"
        print(f"{e['name']:<26} steps {e['steps']:<3} cache: {desc}  {pats}{extra}")
        if "diffs" in e:
            for n, ds in e["diffs"].items():
                print("    diffs", n, ["-" if d is None else round(d, 4) for d in ds])


if __name__ == "__main__":
    main()
