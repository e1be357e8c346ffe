"""Fixtures for step caches on the FLUX pipelines: diffusers' First Block Cache and TaylorSeer.

Runs the tiny pipelines of tests/fixtures/fill_pipeline/tiny (FluxFillPipeline) and
tests/fixtures/kontext/tiny (FluxKontextPipeline) with `transformer.enable_cache(config)` and
records, per run, the output, the final latents, every transformer output, and which transformer
evaluations were computed in full (per cache context, in order), so that a port can check both the
decisions and the numbers.

tests/fixtures/step_cache/
  README.md                   written by this script (semantics, runs, chosen thresholds)
  reference/
    runs.json                 parameters, cache configs, computed lists, FBC diffs, checks, versions
    <run>/image.png, [mask.png], out.png, io.safetensors

Runs: fill_nocache, fill_fbc_0 (threshold 0: bit-identical to no cache), fill_fbc_a / fill_fbc_b
(thresholds picked by rule from a candidate list), fill_taylor_bf16factors (TaylorSeer defaults,
12 steps), fill_taylor_f32_order2 (interval 3, before 2, order 2, f32 factors, 10 steps),
kontext_truecfg_fbc and kontext_truecfg_fbc_split (Kontext, true CFG, FBC; in the second the cond
and uncond contexts decide differently).

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

# Thresholds tried for the FBC runs; the choice among them is made by the rules in main(). The
# lists include values found by a finer scan (0.01 steps) so that the rules find thresholds with a
# comfortable margin; the tiny random models give large first-block diffs (0.2 .. 0.65).
FILL_FBC_CANDIDATES = [0.02, 0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.48, 0.5, 0.6, 0.65, 0.7, 1.0]
KONTEXT_FBC_CANDIDATES = [0.05, 0.1, 0.2, 0.25, 0.29, 0.3, 0.34, 0.39, 0.4, 0.5, 0.6, 0.7]
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
            if self.kind == "fbc":
                state = self.fbc_head.state_manager.get_state()
                prev_head, prev_tail = state.head_block_residual, state.tail_block_residuals
            out = self._orig_forward(*args, **kwargs)
            if self.kind == "fbc":
                assert state is self.fbc_head.state_manager.get_state()
                computed = bool(state.should_compute)
                self.fbc[name]["computed"].append(computed)
                self.fbc[name]["tail_attn_calls"].append(self._tail_calls)
                assert self._tail_calls == (1 if computed else 0)
                # The head residual (the reference of the next comparison) and the tail residuals
                # are replaced on computed calls only.
                assert (state.head_block_residual is not prev_head) == computed
                assert (state.tail_block_residuals is not prev_tail) == computed
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


def pick_fbc(pipe, kwargs, seed, names, candidates):
    """Tries the candidates; returns the table of (threshold, computed, skipped, margin)."""
    table = []
    set_cache(pipe, None)
    for thr in candidates:
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
    table = pick_fbc(pipe, kwargs, FILL["seed"], names, FILL_FBC_CANDIDATES)
    exploration["fill_fbc"] = table
    # Among thresholds keeping MIN_MARGIN to every recorded diff, the one with the largest margin:
    # (a) skipping 1 to 3 of the 7 skippable steps (the first call always computes);
    # (b) skipping more than (a) but not all 7.
    ok = [r for r in table if r["margin"] is not None and r["margin"] >= MIN_MARGIN]
    a = max((r for r in ok if 1 <= r["skipped"]["cond"] <= 3), key=lambda r: r["margin"])
    b = max((r for r in ok if a["skipped"]["cond"] < r["skipped"]["cond"] < 7), key=lambda r: r["margin"])
    for label, r in (("a", a), ("b", b)):
        config = FirstBlockCacheConfig(threshold=r["threshold"])
        res, entry = fill_run(f"fill_fbc_{label}", 8, config, base8)
        assert entry["computed"] == r["computed"]
        entry["threshold_margin"] = margin(entry["diffs"], r["threshold"])
        assert entry["threshold_margin"] >= MIN_MARGIN
        entry["one_thread_check"] = one_thread_check(pipe, kwargs, FILL["seed"], names, config, res)

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
    table = pick_fbc(pipe, kwargs, KONTEXT["seed"], names, KONTEXT_FBC_CANDIDATES)
    exploration["kontext_truecfg_fbc"] = table
    ok = [r for r in table if r["margin"] is not None and r["margin"] >= MIN_MARGIN]
    # kontext_truecfg_fbc: both contexts skip at least one step and compute at least 3 of 8;
    # the largest margin.
    main_pick = max((r for r in ok if all(1 <= r["skipped"][n] <= 5 for n in names)),
                    key=lambda r: r["margin"])
    # kontext_truecfg_fbc_split: the same, but cond and uncond decide differently (so a port that
    # shares FBC state between the contexts, or runs one decision for both, fails).
    split_pick = max((r for r in ok if all(1 <= r["skipped"][n] <= 5 for n in names)
                      and r["computed"]["cond"] != r["computed"]["uncond"]), key=lambda r: r["margin"])
    spec = {"pipeline": "kontext", "prompt": KONTEXT["prompt"], "negative_prompt": KONTEXT["negative_prompt"],
            "true_cfg_scale": KONTEXT["true_cfg_scale"], "seed": KONTEXT["seed"], "steps": KONTEXT["steps"],
            "guidance": KONTEXT["guidance"], "max_sequence_length": KONTEXT["max_sequence_length"],
            "height": KONTEXT["height"], "width": KONTEXT["width"], "max_area": KONTEXT["max_area"],
            "auto_resize": KONTEXT["auto_resize"], "photo": "kontext/reference/true_cfg/image.png (32x64)",
            "given_latents": False, "dtype": "float32", "contexts": names}
    extra = {"nocache_final_latents": base["latents"].contiguous(),
             "nocache_image": torch.from_numpy(np.ascontiguousarray(base["image"])).float()}
    for name, pick in (("kontext_truecfg_fbc", main_pick), ("kontext_truecfg_fbc_split", split_pick)):
        config = FirstBlockCacheConfig(threshold=pick["threshold"])
        res = execute(pipe, kwargs, KONTEXT["seed"], names, config)
        entry = save_run(name, dict(spec, cache=config_json(config)), res, extra_io=extra)
        shutil.copyfile(KONTEXT_PHOTO, REF / name / "image.png")  # byte for byte
        assert entry["computed"] == pick["computed"]
        entry["threshold_margin"] = margin(entry["diffs"], pick["threshold"])
        entry["vs_nocache_image_max_abs"] = float(np.abs(res["image"] - base["image"]).max())
        entry["vs_nocache_latents_max_abs"] = float((res["latents"] - base["latents"]).abs().max())
        entry["nocache_final_latents_in_io"] = "nocache_final_latents"
        entry["one_thread_check"] = one_thread_check(pipe, kwargs, KONTEXT["seed"], names, config, res)
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

    write_readme(runs)
    print_summary(runs, exploration)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.3f} MB)")
    assert total < 1e6


def one_thread_check(pipe, kwargs, seed, names, config, res):
    """The same run with 1 thread instead of 2 (other reduction orders): the decisions must not
    change; reports how much the diffs and the result moved."""
    torch.set_num_threads(1)
    try:
        again = execute(pipe, kwargs, seed, names, config)
    finally:
        torch.set_num_threads(2)
    assert again["computed"] == res["computed"], (again["computed"], res["computed"])
    moved = max(
        (abs(x - y) / y for n in names for x, y in zip(again["diffs"][n], res["diffs"][n]) if y is not None),
        default=0.0,
    )
    return {
        "same_decisions": True,
        "max_relative_diff_change": moved,
        "final_latents_max_abs": float((again["latents"] - res["latents"]).abs().max()),
    }


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


def write_readme(runs):
    by = {e["name"]: e for e in runs}

    def row(name):
        e = by[name]
        c = e["cache"]
        if c is None:
            cache = "none"
        elif c["kind"] == "first_block_cache":
            cache = f"FBC threshold {c['threshold']}"
        else:
            cache = (f"TaylorSeer interval {c['cache_interval']}, before {c['disable_cache_before_step']}, "
                     f"order {c['max_order']}, factors {c['taylor_factors_dtype']}")
        comp = "" if e["computed"] is None else " ".join(f"{n} `{fmt(v)}`" for n, v in e["computed"].items())
        m = e.get("threshold_margin")
        m = "" if m is None else f"{m:.3f}"
        return f"| `{name}` | {e['pipeline']} | {e['steps']} | {cache} | {comp} | {m} |"

    table = "\n".join(row(e["name"]) for e in runs)
    text = README.replace("{TABLE}", table)
    (OUT / "README.md").write_text(text)


README = """# Step-cache fixtures (First Block Cache, TaylorSeer)

Made by `tests/reference/gen_step_cache.py` (diffusers 0.42.1, torch 2.15.0, CPU, 2 threads,
deterministic; the script deletes and rewrites this folder, README included). Whole
`FluxFillPipeline` runs on `tests/fixtures/fill_pipeline/tiny` and `FluxKontextPipeline` runs on
`tests/fixtures/kontext/tiny` (1 double + 2 single blocks, hidden 32), with
`pipe.transformer.enable_cache(FirstBlockCacheConfig(...) | TaylorSeerCacheConfig(...))`. Regenerate
from the repo root with

    .venv-ref/bin/python tests/reference/gen_step_cache.py

## Cache contexts (a diffusers 0.42.1 quirk)

`FluxFillPipeline` and `FluxKontextPipeline` (unlike `FluxPipeline`) call the transformer without
`transformer.cache_context(...)`, so with any stateful cache enabled they raise "No cache context is
set". The script does what `FluxPipeline` does: for each pipeline call `transformer.forward` is
replaced by a counter-based wrapper; call k runs inside `cache_context(contexts[k % len(contexts)])`,
with contexts `["cond"]` for Fill and `["cond", "uncond"]` for Kontext with true CFG (each step calls
the transformer with the positive prompt, then with the negative one). Each context has its own cache
state (`StateManager` keeps one state object per context name); nothing is shared between them.
State is reset at the end of every pipeline call (`maybe_free_model_hooks` ->
`_reset_stateful_cache` -> every stateful hook's `StateManager.reset()`, which drops all per-context
states): checked after every call, and every run is made twice (`output_type="np"` and `"latent"`)
with identical decisions and transformer outputs.

## Runs

`computed`: per context, per denoising step, whether the transformer evaluation was computed in full
(`C`) or served from the cache (`.`). Margin: min over all recorded FBC diffs of
|diff - threshold| / threshold.

| run | pipeline | steps | cache | computed | margin |
|---|---|---|---|---|---|
{TABLE}

Fill runs: `test_image(64, 32, 2)` of gen_fill_pipeline, `rect_mask(64, 32, (0, 0, 32, 32))` (top half),
prompt "make it night", seed 11, guidance 30, max_sequence_length 16, 64x32. Kontext runs: the photo
of `kontext/reference/true_cfg` (32x64, copied byte for byte), prompt "make it night", negative
"blurry", true_cfg_scale 2, seed 13, guidance 2.5, max_sequence_length 16, height 64, width 32,
max_area 2048, `_auto_resize=False`. All f32; the noise comes from the seed (no given latents).

FBC thresholds were picked by rule from candidate lists (all candidates and their patterns are in
`runs.json` `fbc_threshold_exploration`), keeping at least 2 % relative distance to every diff of
the run; each FBC run was also repeated with 1 thread (different reduction order): same decisions,
diffs moved by < 1e-6 relative (`one_thread_check`). `fill_fbc_0` is asserted bit-identical to
`fill_nocache`. The random tiny models give large first-block diffs (0.2 .. 0.8 per step), so
the thresholds here are far above the 0.05 .. 0.2 used with FLUX.1; `kontext_truecfg_fbc_split` has
the smallest margin (about 2 %, uncond step 3: diff 0.333 vs 0.34).

## Files

- `reference/runs.json`: `versions`, `context_wrapper`, `checks`, `fbc_threshold_exploration`
  (per candidate threshold: `computed`, `skipped`, `margin`), and `runs`: per run its parameters,
  `cache` (the config: `kind` `first_block_cache` with `threshold`, or `taylorseer` with all
  `TaylorSeerCacheConfig` fields, dtype as a string), `contexts`, `computed` ({context: [bool per
  step]}; null without cache), FBC: `diffs` ({context: [null, float, ...]}, the value compared with
  the threshold at each call, null on the first call of a context), `threshold_margin`,
  `one_thread_check`; TaylorSeer: `hooked_modules`, `hooked_module_outputs` (type and shapes of
  what each hooked module returns); `vs_nocache_*_max_abs` against the uncached run with the same
  parameters.
- `reference/<run>/image.png` (input image / photo), `mask.png` (Fill), `out.png`
  (`(np * 255).round()`), `io.safetensors` (all float32): `image` [H,W,3] (np output),
  `final_latents` [1,N,64] (output_type "latent", packed), `initial_latents` [1,N,64] (packed
  start latents, from the first transformer call's input), `cond_outputs` [steps,T,64] (the
  transformer's output at every step, cached or not; T = N for Fill, N + M (output + photo tokens,
  before the pipeline's slicing) for Kontext), `uncond_outputs` (Kontext, the negative pass),
  and for the TaylorSeer and Kontext runs `nocache_final_latents`, `nocache_image` (the same run
  without cache).

## First Block Cache (diffusers `hooks/first_block_cache.py`)

Blocks: all children of the transformer named `transformer_blocks` / `single_transformer_blocks`
(ModuleLists), in registration order. Head = `transformer_blocks.0`; tail = the last single block
(`single_transformer_blocks.37` in FLUX.1, `.1` here); all others are "middle" blocks. Both Flux
block types return `(encoder_hidden_states, hidden_states)`.

Per transformer call, in the current context's state:
1. The head block always runs. `residual = head_out_hidden - head_in_hidden` (image stream only, all
   image tokens; for Kontext output + photo tokens), in the model dtype.
2. No stored head residual (first call of the context): compute. Otherwise
   `diff = mean(|residual - prev|) / mean(|prev|)` with `prev` the stored head residual, computed in the
   model dtype (f32 here), `.item()`, and compute iff `diff > threshold` (strict; threshold 0 computes
   every step).
3. Compute: the head output is returned unchanged, the state stores `head_block_output` (hidden,
   encoder) and `head_block_residual = residual`; middle blocks and the tail run; after the tail the
   state stores `tail_block_residuals = (tail_out_hidden - head_out_hidden, tail_out_encoder -
   head_out_encoder)`.
4. Skip: the head returns `(head_out_encoder + tail_res_encoder, head_out_hidden + tail_res_hidden)`
   with the stored tail residuals; middle and tail blocks return their inputs unchanged. The head
   residual is NOT updated: the next call compares against the residual of the last computed call
   (checked: `head_block_residual` and `tail_block_residuals` change exactly on computed calls).
5. Everything outside the blocks (embedders, time/guidance/text embeddings, RoPE, norm_out,
   proj_out) runs on every call.

## TaylorSeer (diffusers `hooks/taylorseer_cache.py`)

Hooked modules (default patterns `^transformer_blocks.*attn`, `^single_transformer_blocks.*attn`,
re.fullmatch): every block's `attn` (FluxAttention) only: here `transformer_blocks.0.attn`,
`single_transformer_blocks.0.attn`, `single_transformer_blocks.1.attn`. The rest of each block (norms,
modulation, FF / MLP, proj_out, residual adds) runs every step. A double block's attn returns the
tuple (image attention after `to_out`, text attention after `to_add_out`), [1,N,D] and [1,S,D]; a
single block's attn (pre_only, no output projection) returns one tensor [1,S+N,D] (text first),
before the block's `proj_out`.

Each hooked module has its own state per context, with its own step counter `s`, starting at 0 and
incremented on every call of that module in that context (here = the denoising step; all hooked
modules share one schedule, checked). Module computes iff
`s < disable_cache_before_step or (s - disable_cache_before_step - 1) % cache_interval == 0 or
(disable_cache_after_step is not None and s >= disable_cache_after_step)` (Python `%`, non-negative).
Defaults (5, 3): computed steps 0, 1, 2, 4, 9, 14, ...; step 3 (= disable_cache_before_step) is
predicted. (3, 2): 0, 1, 3, 6, 9, ...

Update (computed step s, per output tensor i, f = the fresh output in the module dtype):
`new[0] = f`; if there was an earlier update at step l: `d = s - l` and for j in 0..max_order-1 while
an old factor of order j exists: `new[j+1] = (new[j] - old[j].to(f.dtype)) / d` (new[j] not rounded,
old[j] stored rounded); then `factors = [x.to(taylor_factors_dtype) for x in new]`, `l = s`. So the
number of orders grows by one per update up to max_order + 1 (first update: order 0 only). The
computed step returns f itself (unrounded).

Predict (step s, offset `o = s - l`): `out = zeros(dtype=module dtype)`, then for k in 0..len(factors)-1:
`out = out + factors[k].to(module dtype) * (o**k / k!)` (Python float coefficient). With bf16 factors,
the prediction uses the bf16-rounded order-0 value. Checked bit for bit against an independent
reimplementation on both TaylorSeer runs.
"""


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
        if e.get("threshold_margin") is not None:
            extra += f"  margin {e['threshold_margin']:.4f}"
        if "one_thread_check" in e:
            extra += f"  1-thread diff change {e['one_thread_check']['max_relative_diff_change']:.1e}"
        print(f"{e['name']:<26} steps {e['steps']:<3} cache: {desc}  {pats}{extra}")
        if "diffs" in e:
            for n, ds in e["diffs"].items():
                print("    diffs", n, ["-" if d is None else round(d, 4) for d in ds])


if __name__ == "__main__":
    main()
