"""Fixtures for the FLUX.1 Kontext [dev] pipelines (FluxKontextPipeline, FluxKontextInpaintPipeline).

Builds a tiny Kontext pipeline folder in the diffusers layout of
black-forest-labs/FLUX.1-Kontext-dev, reusing the tiny text encoders / tokenizers / VAE of the Fill
fixture (tests/fixtures/fill_pipeline/tiny, built by gen_fill_pipeline.py, copied byte for byte),
and records diffusers' results:

tests/fixtures/kontext/
  tiny/                          the pipeline folder
    model_index.json             "_class_name": "FluxKontextPipeline"
    transformer/                 FluxTransformer2DModel, Kontext-shaped (64 -> 64), sharded + index
    text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/, scheduler/   copies from Fill
    flux1-kontext-dev.safetensors  the same transformer under BFL single-file names
  adapters/lora_peft.safetensors PEFT LoRA r=4 alpha=8, written by FluxKontextPipeline.save_lora_weights
  reference/
    sizes.json                   photo auto-resize and output-size rules, from diffusers' own code
    runs.json                    whole-pipeline runs: parameters, notes, versions
    <run>/image.png, [mask.png], [latents.safetensors], out.png, io.safetensors
  README.md

Every size in sizes.json comes from a real pipeline call (prepare_latents intercepted, so the
rest of the call is skipped) and is checked against a verbatim copy of diffusers' formula.
The transformer's first call(s) of every run are captured with a forward hook.

The BFL file is checked by loading it back with FluxTransformer2DModel.from_single_file, using
gen_gguf's patched converter (diffusers hard-codes inner_dim = 3072 for single_blocks.*.linear1).

Run (from the repo root, in the reference venv; deterministic, CPU, 2 threads):
  .venv-ref/bin/python tests/reference/gen_kontext.py
"""

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_edit_adapters as edit  # noqa: E402
import gen_fill_pipeline as fill  # noqa: E402
import gen_gguf as gg  # noqa: E402  (sets HF_HUB_OFFLINE=1)

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import PIL  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import FluxKontextInpaintPipeline, FluxKontextPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FILL_TINY = ROOT / "tests" / "fixtures" / "fill_pipeline" / "tiny"
OUT = ROOT / "tests" / "fixtures" / "kontext"
TINY = OUT / "tiny"
TDIR = TINY / "transformer"
BFL_FILE = TINY / "flux1-kontext-dev.safetensors"
ADAPTERS = OUT / "adapters"
LORA_FILE = ADAPTERS / "lora_peft.safetensors"
REF = OUT / "reference"

COPIED = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"]
MODEL_SEED = 31  # Fill's tiny transformer uses 13
PROJ_OUT_GAIN = 20.0  # as gen_fill_pipeline.build_transformer
LORA_SEED = 101

# LoRA targets: every attention projection, the image MLP of the double block, and the single
# blocks' attention / MLP / output projections (full module paths).
LORA_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
               "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2"]
LORA_SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]

MAX_SEQ = 16
INPAINT_BOX = (5, 13, 37, 45)  # top, left, bottom, right: not 8-aligned, so nearest sampling matters
# The auto_resize run's photo becomes a preferred Kontext resolution (672x1568: 42 x 98 = 4116 photo
# tokens, 1 MB per [1, tokens, 64] f32 tensor). To keep the folder under 3 MB its io stores only the
# first AUTO_RESIZE_PHOTO_ROWS packed rows of photo tokens: image_latents[:, :rows*42], and
# step0_hidden_states / step0_output[:, :N + rows*42] (N output tokens first). image_ids is full.
AUTO_RESIZE_PHOTO_ROWS = 16

# Photos: (width, height, pattern seed) for fill.test_image.
PHOTO_A = (64, 48, 21)
PHOTO_B = (32, 64, 22)
PHOTO_C = (40, 100, 23)

RUNS = [
    dict(name="latents", pipeline="kontext", photo=PHOTO_A, prompt="make it night", seed=3, steps=3,
         guidance=2.5, height=48, width=64, max_area=48 * 64, auto_resize=False, given_latents=True),
    dict(name="seed", pipeline="kontext", photo=PHOTO_B, prompt="give him a red scarf", seed=11, steps=4,
         guidance=3.5, height=64, width=32, max_area=64 * 32, auto_resize=False, given_latents=False),
    dict(name="other_size", pipeline="kontext", photo=PHOTO_A, prompt="make it night", seed=5, steps=3,
         guidance=2.5, height=32, width=48, max_area=32 * 48, auto_resize=False, given_latents=False),
    dict(name="auto_resize", pipeline="kontext", photo=PHOTO_C, prompt="make it night", seed=7, steps=2,
         guidance=2.5, height=32, width=32, max_area=32 * 32, auto_resize=True, given_latents=False),
    dict(name="true_cfg", pipeline="kontext", photo=PHOTO_B, prompt="give him a red scarf",
         negative_prompt="blurry", true_cfg_scale=2.0, seed=13, steps=3, guidance=3.5, height=64, width=32,
         max_area=64 * 32, auto_resize=False, given_latents=False),
    dict(name="lora", pipeline="kontext", photo=PHOTO_A, prompt="make it night", seed=3, steps=3,
         guidance=2.5, height=48, width=64, max_area=48 * 64, auto_resize=False, given_latents=True,
         lora=LORA_FILE.name),
    dict(name="inpaint", pipeline="kontext_inpaint", photo=PHOTO_A, mask_box=INPAINT_BOX,
         prompt="make it night", seed=17, steps=3, guidance=2.5, height=48, width=64, max_area=48 * 64,
         auto_resize=False, given_latents=False),
    dict(name="latents_bf16", pipeline="kontext", photo=PHOTO_A, prompt="make it night", seed=3, steps=3,
         guidance=2.5, height=48, width=64, max_area=48 * 64, auto_resize=False, given_latents=True,
         dtype="bfloat16"),
]

INPAINT_NOTES = (
    "FluxKontextInpaintPipeline (diffusers 0.42.1), image_reference=None, strength=1.0, "
    "padding_mask_crop=None. (1) Output size: height/width/max_area go through the same max_area "
    "formula as FluxKontextPipeline but are then OVERWRITTEN by the photo's (auto-)resized size: the "
    "output always has the photo's size (here 64x48). (2) The photo is resized like Kontext's "
    "(get_default_height_width floors to 16, optional preferred resolution, PIL lanczos resize, "
    "[-1,1]) and encoded with the VAE MODE (latent_dist.mode(), no random draw): image_latents = "
    "(mean - shift) * scale, packed; image_ids = grid ids with id[0] = 1. With image_reference=None "
    "these photo latents are BOTH the inpainting init latents and the Kontext reference tokens "
    "appended to the transformer input (hidden_states = cat([latents, image_latents], 1), img_ids = "
    "cat([latent_ids, image_ids], 0)); with an image_reference, the reference's latents/ids (id[0]=1) "
    "would be appended instead, and the photo is used only for the blend. (3) Timesteps: mu from "
    "image_seq_len = (H/16)*(W/16) (output tokens only), retrieve_timesteps with sigmas "
    "linspace(1, 1/steps, steps), then get_timesteps(strength): t_start = int(steps - min(steps*strength, "
    "steps)), timesteps[t_start:], scheduler.set_begin_index(t_start). (4) Random draws from the "
    "generator, in order: first noise = randn([1,16,H/8,W/8]) (prepare_latents; skipped when latents "
    "are given, which are then used as noise AND as start latents unchanged, whatever the strength); "
    "start latents = scheduler.scale_noise(image_latents, t0, noise) = sigma0*noise + (1-sigma0)*"
    "image_latents with sigma0 = sigmas[t_start] (= 1.0 at strength 1, so exactly the noise; "
    "asserted). Second, prepare_mask_latents VAE-encodes masked_image = photo * (mask < 0.5) with "
    "latent_dist.sample(generator), i.e. a second randn([1,16,H/8,W/8]) draw, but that result is "
    "discarded (`mask, _ = ...`): it only advances the generator, which is not used again, so a port "
    "can skip the encode and the draw. (5) Mask: mask_processor (grayscale, no normalize, binarize "
    "at 0.5: 1 where mask >= 0.5 i.e. white = edit) at the photo size, then "
    "F.interpolate(mode='nearest') to [H/8, W/8] (source pixel floor(i*8)), repeated to 16 channels "
    "and packed like latents -> mask [1, N, 64] (stored as io 'mask'). (6) Loop, per step i: "
    "transformer on cat([latents, image_latents]) exactly as Kontext (guidance float32 "
    "embedded, timestep t/1000, output sliced to the first N tokens, optional true CFG), "
    "latents = scheduler.step(...); then init_latents_proper = image_latents, and if i < last: "
    "scale_noise(image_latents, timesteps[i+1], noise) = sigma_{i+1}*noise + (1-sigma_{i+1})*"
    "image_latents (the SAME first noise every step; scale_noise uses scheduler.step_index = i+1); "
    "latents = (1 - mask)*init_latents_proper + mask*latents. So after the last step the unmasked "
    "tokens are exactly image_latents (clean photo latents). (7) Decode as Kontext."
)

KONTEXT_NOTES = (
    "FluxKontextPipeline: output height/width default to 1024 (default_sample_size 128 * vae_scale_factor "
    "8), then w = round(sqrt(max_area * w/h)), h = round(sqrt(max_area / (w/h))), both floored to 16. "
    "Photo: get_default_height_width floors its size to 16 first, then (auto_resize) the preferred "
    "Kontext resolution with the closest aspect ratio (ties: smaller w, then h), floored to 16, PIL "
    "lanczos resize, [-1,1]; VAE mode (no random draw), (mean - shift) * scale, packed -> image_latents; "
    "image_ids = grid ids of the photo latents with id[0] = 1. Noise randn([1,16,h/8,w/8]) is the only "
    "random draw (none when latents are given). mu from the output token count only. Each step: "
    "transformer(cat([latents, image_latents], 1), img_ids = cat([latent_ids, image_ids], 0)), output "
    "sliced to the first N (output) tokens, true CFG if negative_prompt and true_cfg_scale > 1: "
    "neg + scale * (pos - neg), Euler step."
)


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# Model folder


def build_transformer(joint_dim, pooled_dim):
    fill.seeded(MODEL_SEED)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        out_channels=None,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    ).eval()
    fill.randomize(model)
    with torch.no_grad():
        model.proj_out.weight.mul_(PROJ_OUT_GAIN)
    assert model.out_channels == 64
    return model


def build_folder():
    assert (FILL_TINY / "model_index.json").exists(), "run gen_fill_pipeline.py first"
    TINY.mkdir(parents=True)
    for sub in COPIED:
        shutil.copytree(FILL_TINY / sub, TINY / sub)
        for f in (FILL_TINY / sub).rglob("*"):
            if f.is_file():
                assert (TINY / sub / f.relative_to(FILL_TINY / sub)).read_bytes() == f.read_bytes(), f
    index = json.loads((FILL_TINY / "model_index.json").read_text())
    index["_class_name"] = "FluxKontextPipeline"
    (TINY / "model_index.json").write_text(json.dumps(index, indent=2))

    fill_cfg = json.loads((FILL_TINY / "transformer" / "config.json").read_text())
    model = build_transformer(fill_cfg["joint_attention_dim"], fill_cfg["pooled_projection_dim"])
    model.save_pretrained(TDIR, max_shard_size="200KB")
    assert any(TDIR.glob("*.index.json")), "transformer should be sharded like the real repo"

    # BFL single file, checked by diffusers' own loader (inner_dim patch from gen_gguf).
    cfg = dict(model.config)
    sd = model.state_dict()
    save_file(gg.to_bfl(sd, cfg), BFL_FILE)
    gg.install_converter()
    try:
        back = FluxTransformer2DModel.from_single_file(
            str(BFL_FILE), config=str(TDIR), torch_dtype=torch.float32, local_files_only=True
        )
    finally:
        gg.uninstall_converter()
    back_sd = back.state_dict()
    assert set(back_sd) == set(sd), set(back_sd) ^ set(sd)
    for k in sd:
        assert torch.equal(back_sd[k], sd[k]), k
    # And the folder loads back to the same weights.
    again = FluxTransformer2DModel.from_pretrained(TDIR, torch_dtype=torch.float32).state_dict()
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    return model


def fresh_pipe(dtype=torch.float32):
    pipe = FluxKontextPipeline.from_pretrained(TINY, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    return pipe


def inpaint_pipe(dtype=torch.float32):
    base = fresh_pipe(dtype)
    pipe = FluxKontextInpaintPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_targets(cfg):
    out = []
    for i in range(cfg["num_layers"]):
        out += [f"transformer_blocks.{i}.{m}" for m in LORA_DOUBLE]
    for i in range(cfg["num_single_layers"]):
        out += [f"single_transformer_blocks.{i}.{m}" for m in LORA_SINGLE]
    return out


def make_lora():
    ADAPTERS.mkdir(parents=True)
    pipe = fresh_pipe()
    modules = lora_targets(pipe.transformer.config)
    pipe.transformer.add_adapter(LoraConfig(r=edit.RANK, lora_alpha=edit.ALPHA, target_modules=list(modules)))
    wrapped = sorted(n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == sorted(modules), set(wrapped) ^ set(modules)
    g = torch.Generator("cpu").manual_seed(LORA_SEED)
    params = dict(pipe.transformer.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if ".lora_A." in name:
                p.copy_(edit.lora_a(*p.shape, g))
            elif ".lora_B." in name:
                p.copy_(edit.lora_b(*p.shape, g))
    state = get_peft_model_state_dict(pipe.transformer)
    tmp = Path(tempfile.mkdtemp())
    try:
        FluxKontextPipeline.save_lora_weights(
            tmp,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=edit.lora_config_dict(modules),
            safe_serialization=True,
        )
        written = list(tmp.iterdir())
        assert [p.name for p in written] == ["pytorch_lora_weights.safetensors"], written
        shutil.move(str(written[0]), LORA_FILE)
        edit.canonical_metadata_order(LORA_FILE)
    finally:
        shutil.rmtree(tmp)
    sd = load_file(LORA_FILE)
    assert len(sd) == 2 * len(modules)
    for m in modules:
        assert f"transformer.{m}.lora_A.weight" in sd and f"transformer.{m}.lora_B.weight" in sd, m
    return modules


# ---------------------------------------------------------------------------------------------
# Sizes


class Stop(Exception):
    pass


def output_formula(height, width, max_area, vae_scale_factor=8, default_sample_size=128):
    """Verbatim: the first lines of FluxKontextPipeline.__call__."""
    height = height or default_sample_size * vae_scale_factor
    width = width or default_sample_size * vae_scale_factor
    aspect_ratio = width / height
    width = round((max_area * aspect_ratio) ** 0.5)
    height = round((max_area / aspect_ratio) ** 0.5)
    multiple_of = vae_scale_factor * 2
    return width // multiple_of * multiple_of, height // multiple_of * multiple_of


def photo_formula(pipe, img, auto_resize, multiple_of=16):
    """Verbatim: step 3 of FluxKontextPipeline.__call__. Returns (w, h)."""
    image_height, image_width = pipe.image_processor.get_default_height_width(img)
    aspect_ratio = image_width / image_height
    if auto_resize:
        _, image_width, image_height = min(
            (abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
        )
    return image_width // multiple_of * multiple_of, image_height // multiple_of * multiple_of


def probe(pipe, image, height, width, max_area, auto_resize):
    """A real pipeline call, stopped in prepare_latents: (photo tensor [w, h] or None, output [w, h])."""
    got = {}

    def prep(image, batch_size, num_channels_latents, height, width, *rest, **kw):
        got["photo"] = None if image is None else [int(image.shape[3]), int(image.shape[2])]
        got["out"] = [int(width), int(height)]
        raise Stop

    pipe.prepare_latents = prep
    try:
        pipe(image=image, prompt="x", height=height, width=width, max_area=max_area,
             _auto_resize=auto_resize, max_sequence_length=MAX_SEQ, num_inference_steps=1)
        raise AssertionError("probe did not reach prepare_latents")
    except Stop:
        pass
    finally:
        del pipe.prepare_latents
    return got["photo"], got["out"]


PHOTO_SIZES = [  # (w, h)
    (1024, 1024), (1023, 767), (640, 427), (17, 33), (3000, 2000), (1080, 1920), (1920, 1080),
    (4000, 100), (100, 4000), (512, 512), (800, 600), (600, 800), (16, 16), (2048, 1024), (64, 48),
    (32, 64), (40, 100), (1536, 1536), (1568, 672), (703, 1601),
]
OUTPUT_CASES = [  # (height, width, max_area)
    (None, None, 1024**2), (1024, 1024, 1024**2), (512, 768, 1024**2), (768, 512, 1024**2),
    (48, 64, 48 * 64), (1000, 333, 512 * 512), (333, 1000, 512 * 512), (None, 512, 1024**2),
    (720, 1280, 1024**2), (64, 32, 64 * 32), (32, 48, 32 * 48), (32, 32, 32 * 32), (17, 33, 1000),
    (1080, 1920, 512 * 512),
]


def make_sizes(pipe):
    auto = []
    for w, h in PHOTO_SIZES:
        assert min(w, h) >= 16
        img = Image.new("RGB", (w, h))
        for flag in (True, False):
            expected = list(photo_formula(pipe, img, flag))
            photo, _ = probe(pipe, img, 32, 32, 1024, flag)
            assert photo == expected, (w, h, flag, photo, expected)
            auto.append({"image": [w, h], "auto_resize": flag, "resized": photo})
    outputs = []
    for height, width, max_area in OUTPUT_CASES:
        expected = list(output_formula(height, width, max_area))
        _, out = probe(pipe, None, height, width, max_area, False)
        assert out == expected, (height, width, max_area, out, expected)
        outputs.append({"height": height, "width": width, "max_area": max_area, "out": out})
    sizes = {
        "note": "auto_resize: photo [w, h] -> the size the photo is resized to before VAE encoding "
        "(FluxKontextPipeline step 3). output: the generated image's [w, h] from height/width/max_area "
        "(top of __call__; null = default 1024). All from real pipeline calls stopped in "
        "prepare_latents, and equal to the verbatim formulas.",
        "preferred_kontext_resolutions": [list(r) for r in PREFERRED_KONTEXT_RESOLUTIONS],
        "auto_resize": auto,
        "output": outputs,
    }
    (REF / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return sizes


# ---------------------------------------------------------------------------------------------
# Runs


class Capture:
    """prepare_latents / prepare_mask_latents results and the first transformer calls."""

    def __init__(self, pipe, max_calls):
        self.pipe = pipe
        self.max_calls = max_calls
        self.calls = []
        self.prep = None
        self.prep_args = None
        self.mask = None
        orig = pipe.prepare_latents

        def prep(*a, **k):
            out = orig(*a, **k)
            self.prep_args = a
            self.prep = out
            return out

        pipe.prepare_latents = prep
        if hasattr(pipe, "prepare_mask_latents"):
            orig_mask = pipe.prepare_mask_latents

            def prep_mask(*a, **k):
                out = orig_mask(*a, **k)
                self.mask = out[0]
                return out

            pipe.prepare_mask_latents = prep_mask
        self.handle = pipe.transformer.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        if len(self.calls) < self.max_calls:
            assert not args
            ins = {k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}
            self.calls.append((ins, output[0].detach().clone()))

    def remove(self):
        self.handle.remove()
        del self.pipe.prepare_latents
        if "prepare_mask_latents" in vars(self.pipe):
            del self.pipe.prepare_mask_latents


def f32(t):
    return t.detach().to(torch.float32).contiguous()


def do_run(spec, lora_modules):
    name = spec["name"]
    folder = REF / name
    folder.mkdir()
    dtype_name = spec.get("dtype", "float32")
    dtype = getattr(torch, dtype_name)
    inpaint = spec["pipeline"] == "kontext_inpaint"
    pipe = inpaint_pipe(dtype) if inpaint else fresh_pipe(dtype)
    if spec.get("lora"):
        pipe.load_lora_weights(ADAPTERS / spec["lora"])
        n = len([m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)])
        assert n == len(lora_modules), n

    pw, ph, pseed = spec["photo"]
    photo = fill.test_image(ph, pw, pseed)
    photo.save(folder / "image.png")
    kwargs = dict(
        image=photo,
        prompt=spec["prompt"],
        negative_prompt=spec.get("negative_prompt"),
        true_cfg_scale=spec.get("true_cfg_scale", 1.0),
        height=spec["height"],
        width=spec["width"],
        max_area=spec["max_area"],
        _auto_resize=spec["auto_resize"],
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance"],
        max_sequence_length=MAX_SEQ,
    )
    if inpaint:
        mask = fill.rect_mask(ph, pw, spec["mask_box"])
        mask.save(folder / "mask.png")
        kwargs["mask_image"] = mask
    out_w, out_h = output_formula(spec["height"], spec["width"], spec["max_area"])
    if inpaint:
        out_w, out_h = photo_formula(pipe, photo, spec["auto_resize"])
    if spec["given_latents"]:
        g = torch.Generator("cpu").manual_seed(spec["seed"] + 1000)
        lat = torch.randn(1, 16, out_h // 8, out_w // 8, generator=g)
        save_file({"latents": lat.contiguous()}, folder / "latents.safetensors")
        kwargs["latents"] = pipe._pack_latents(lat, 1, 16, out_h // 8, out_w // 8).to(dtype)

    cfg = kwargs["negative_prompt"] is not None and kwargs["true_cfg_scale"] > 1
    cap = Capture(pipe, 2 if cfg else 1)
    t0 = time.time()
    with torch.no_grad():
        image = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(spec["seed"]), output_type="np").images[0]
        prep1, mask1 = cap.prep, cap.mask
        calls = cap.calls
        cap.max_calls = 0
        final = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(spec["seed"]),
                     output_type="latent").images
    seconds = time.time() - t0
    prep2, mask2 = cap.prep, cap.mask
    cap.remove()
    for a, b in zip(prep1, prep2):
        assert (a is None and b is None) or torch.equal(a, b), "prepare_latents not deterministic"
    assert image.shape == (out_h, out_w, 3), (image.shape, out_h, out_w)

    if inpaint:
        latents0, image_latents, _ref_latents, latent_ids, image_ids, _ref_ids, noise = prep1
        assert _ref_latents is None and _ref_ids is None
        assert torch.equal(latents0, noise), "strength 1: start latents should be the noise exactly"
    else:
        latents0, image_latents, latent_ids, image_ids = prep1
    photo_tensor = cap.prep_args[0]  # the preprocessed photo prepare_latents got, [1, 3, h, w]
    resized = [int(photo_tensor.shape[3]), int(photo_tensor.shape[2])]

    png = Image.fromarray((image * 255).round().astype(np.uint8))
    png.save(folder / "out.png")

    io = {
        "image": torch.from_numpy(np.ascontiguousarray(image)),
        "final_latents": f32(final),
        "initial_latents": f32(latents0),
        "image_latents": f32(image_latents),
        "latent_ids": f32(latent_ids),
        "image_ids": f32(image_ids),
    }
    dtypes = {
        "final_latents": str(final.dtype), "initial_latents": str(latents0.dtype),
        "image_latents": str(image_latents.dtype), "latent_ids": str(latent_ids.dtype),
        "image_ids": str(image_ids.dtype),
    }
    if inpaint:
        io["noise"] = f32(noise)
        io["mask"] = f32(mask1)
        dtypes["noise"] = str(noise.dtype)
        dtypes["mask"] = str(mask1.dtype)
        assert torch.equal(mask1, mask2)
        keep = mask1 == 0
        assert torch.equal(final[keep], image_latents[keep]), "unmasked features should be the photo latents"
    ins, output = calls[0]
    step0 = {
        "hidden_states": ins["hidden_states"],
        "timestep": ins["timestep"],
        "guidance": ins["guidance"],
        "encoder_hidden_states": ins["encoder_hidden_states"],
        "pooled_projections": ins["pooled_projections"],
        "txt_ids": ins["txt_ids"],
        "img_ids": ins["img_ids"],
        "output": output,
    }
    # Sanity: what the transformer got is what prepare_latents made.
    n_out = latents0.shape[1]
    assert torch.equal(ins["hidden_states"], torch.cat([latents0, image_latents], 1))
    assert torch.equal(ins["img_ids"], torch.cat([latent_ids, image_ids], 0))
    if cfg:
        neg_ins, neg_out = calls[1]
        assert torch.equal(neg_ins["hidden_states"], ins["hidden_states"])
        step0["neg_encoder_hidden_states"] = neg_ins["encoder_hidden_states"]
        step0["neg_pooled_projections"] = neg_ins["pooled_projections"]
        step0["neg_output"] = neg_out
    for k, v in step0.items():
        dtypes[f"step0_{k}"] = str(v.dtype)
        io[f"step0_{k}"] = f32(v)
    truncated = {}
    if spec["name"] == "auto_resize":
        # Only a token prefix of the big [1, tokens, 64] tensors (see AUTO_RESIZE_PHOTO_ROWS).
        cols = resized[0] // 16
        keep_photo = AUTO_RESIZE_PHOTO_ROWS * cols
        for k, keep in (("image_latents", keep_photo), ("step0_hidden_states", n_out + keep_photo),
                        ("step0_output", n_out + keep_photo)):
            truncated[k] = {"stored_tokens": keep, "full_tokens": int(io[k].shape[1])}
            io[k] = io[k][:, :keep].contiguous()
    save_file(io, folder / "io.safetensors")

    entry = {
        "name": name,
        "pipeline": spec["pipeline"],
        "prompt": spec["prompt"],
        "negative_prompt": spec.get("negative_prompt"),
        "true_cfg_scale": spec.get("true_cfg_scale", 1.0),
        "seed": spec["seed"],
        "steps": spec["steps"],
        "guidance": spec["guidance"],
        "max_sequence_length": MAX_SEQ,
        "height": spec["height"],
        "width": spec["width"],
        "max_area": spec["max_area"],
        "auto_resize": spec["auto_resize"],
        "given_latents": spec["given_latents"],
        "lora": spec.get("lora"),
        "lora_weight": 1.0 if spec.get("lora") else None,
        "dtype": dtype_name,
        "photo_size": [pw, ph],
        "resized_photo": resized,
        "output_size": [out_w, out_h],
        "output_tokens": int(n_out),
        "photo_tokens": int(image_latents.shape[1]),
        "io_dtypes": dtypes,
        "io_truncated": truncated or None,
        "notes": INPAINT_NOTES if inpaint else KONTEXT_NOTES,
    }
    if inpaint:
        entry["strength"] = 1.0
        entry["mask_box_top_left_bottom_right"] = list(spec["mask_box"])
    log(f"  run {name}: photo {pw}x{ph} -> {resized[0]}x{resized[1]}, out {out_w}x{out_h}, "
        f"{seconds:.1f}s (two calls)")
    return entry, image


def main():
    t_start = time.time()
    torch.set_num_threads(2)
    diffusers_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if OUT.exists():
        shutil.rmtree(OUT)
    REF.mkdir(parents=True)

    model = build_folder()
    log(f"transformer: {sum(p.numel() for p in model.parameters())} parameters; BFL file checked")
    lora_modules = make_lora()
    log(f"LoRA on {len(lora_modules)} modules")

    sizes = make_sizes(fresh_pipe())
    log(f"sizes: {len(sizes['auto_resize'])} photo cases, {len(sizes['output'])} output cases")

    runs = []
    images = {}
    for spec in RUNS:
        entry, image = do_run(spec, lora_modules)
        runs.append(entry)
        images[spec["name"]] = image

    lora_diff = float(np.abs(images["lora"] - images["latents"]).max())
    bf16_diff = float(np.abs(images["latents_bf16"] - images["latents"]).max())
    assert lora_diff > 10 / 255, lora_diff
    checks = {"lora_vs_latents_image_max_abs": lora_diff, "bf16_vs_f32_image_max_abs": bf16_diff}
    log(f"checks: {checks}")

    versions = {
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "safetensors": safetensors.__version__, "numpy": np.__version__, "PIL": PIL.__version__,
    }
    (REF / "runs.json").write_text(
        json.dumps(
            {
                "versions": versions,
                "checks": checks,
                "lora": {"file": f"adapters/{LORA_FILE.name}", "rank": edit.RANK, "alpha": edit.ALPHA,
                         "scale": edit.ALPHA / edit.RANK, "modules": lora_modules},
                "runs": runs,
            },
            indent=1,
        )
    )
    write_readme(lora_modules)

    total = 0
    log(f"\nwrote {OUT}:")
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            log(f"  {f.relative_to(OUT)}  {f.stat().st_size}")
    log(f"total {total / 1e6:.3f} MB, {time.time() - t_start:.1f}s")
    assert total < 3.0e6, total


def write_readme(lora_modules):
    mask = load_file(REF / "inpaint" / "io.safetensors")["mask"][0]
    mixed = int(((mask.min(1).values == 0) & (mask.max(1).values == 1)).sum())
    MIXED_NOTE = f"{mixed} of the {mask.shape[0]} tokens of the `inpaint` run"
    text = f"""# FLUX.1 Kontext fixtures

Made by `tests/reference/gen_kontext.py` (diffusers {diffusers.__version__}, torch {torch.__version__},
CPU, 2 threads, deterministic). `tiny/` is a complete FLUX.1 Kontext [dev] pipeline folder in the
diffusers layout with random weights: the text encoders, tokenizers, VAE and scheduler are byte
copies of `tests/fixtures/fill_pipeline/tiny` (so run `gen_fill_pipeline.py` first), the transformer
is a new `FluxTransformer2DModel` (in 64 -> out 64, hidden 32, 1 double + 2 single blocks, guidance
embedding, rope axes [4, 6, 6], seed {MODEL_SEED}, proj_out x{PROJ_OUT_GAIN:g}), sharded with an index
like the real repo, and also written as the BFL single file `flux1-kontext-dev.safetensors`
(checked by loading it back with `FluxTransformer2DModel.from_single_file`, which needs gen_gguf's
patch of diffusers' hard-coded `inner_dim = 3072`). `reference/` holds whole `FluxKontextPipeline` /
`FluxKontextInpaintPipeline` runs on `tiny/` (parameters and notes on what diffusers does in
`runs.json`) and the photo auto-resize / output size rules taken from real pipeline calls
(`sizes.json`). Regenerate from the repo root with

    .venv-ref/bin/python tests/reference/gen_kontext.py

## Files
- `tiny/model_index.json` (`FluxKontextPipeline`), `tiny/transformer/` (config, shards + index),
  `tiny/{{text_encoder,text_encoder_2,tokenizer,tokenizer_2,vae,scheduler}}/` (copies),
  `tiny/flux1-kontext-dev.safetensors` (BFL names).
- `adapters/lora_peft.safetensors`: PEFT LoRA r={edit.RANK}, alpha={edit.ALPHA} (scale {edit.ALPHA / edit.RANK:g}),
  A ~ N(0, 1/sqrt(in)), B ~ N(0, {edit.B_STD}), seed {LORA_SEED}, written by
  `FluxKontextPipeline.save_lora_weights` with its metadata (header entries sorted). Targets
  ({len(lora_modules)}): double `attn.to_q/k/v`, `attn.to_out.0`, `attn.add_q/k/v_proj`, `attn.to_add_out`,
  `ff.net.0.proj`, `ff.net.2`; single `attn.to_q/k/v`, `proj_mlp`, `proj_out`.
- `reference/sizes.json`: `auto_resize` ({{image [w,h], auto_resize, resized [w,h]}}) and `output`
  ({{height, width, max_area, out [w,h]}}).
- `reference/runs.json`: versions, checks, the LoRA, and per run its parameters, `resized_photo`,
  `output_size`, `io_dtypes` (dtype each tensor had in diffusers; all are stored as float32),
  `io_truncated`, `notes`.
- `reference/<run>/`: `image.png` (the photo as given, before resizing), `mask.png` (inpaint),
  `latents.safetensors` (`latents` [1,16,H/8,W/8], given runs; passed packed), `out.png`
  (`(np * 255).round()`), `io.safetensors`:
  `image` [H,W,3] (np output), `final_latents` [1,N,64] (output_type "latent"), `initial_latents`
  [1,N,64] (packed start latents from prepare_latents), `image_latents` [1,M,64] (packed photo
  latents), `latent_ids` [N,3], `image_ids` [M,3] (before concatenation), the first transformer
  call's kwargs `step0_hidden_states` [1,N+M,64], `step0_timestep` [1] (t/1000), `step0_guidance` [1],
  `step0_encoder_hidden_states` [1,{MAX_SEQ},32], `step0_pooled_projections` [1,32], `step0_txt_ids`
  [{MAX_SEQ},3], `step0_img_ids` [N+M,3], and `step0_output` [1,N+M,64] (before slicing to N);
  `true_cfg` also `step0_neg_encoder_hidden_states`, `step0_neg_pooled_projections`,
  `step0_neg_output` (the negative call of step 0); `inpaint` also `noise` [1,N,64] and `mask`
  [1,N,64] (packed latent mask). In `auto_resize` (photo 40x100 -> 672x1568: M = 42 x 98 = 4116,
  N = 4) only token prefixes are stored, to keep the folder small (`io_truncated`): `image_latents`
  the first {AUTO_RESIZE_PHOTO_ROWS} packed rows ({AUTO_RESIZE_PHOTO_ROWS * 42} tokens), `step0_hidden_states` and
  `step0_output` the first N + {AUTO_RESIZE_PHOTO_ROWS * 42} tokens (output tokens, then those photo tokens);
  `image_ids`, `step0_img_ids` and everything else are full.

Runs: `latents` (given latents), `seed`, `other_size` (output size differs from the photo's),
`auto_resize`, `true_cfg`, `lora` (= `latents` with the LoRA), `inpaint` (FluxKontextInpaintPipeline),
`latents_bf16` (= `latents` in bfloat16). All prompts use max_sequence_length {MAX_SEQ}; the images
are what a random tiny model makes, not pictures.

## diffusers {diffusers.__version__} behaviour worth matching (details in `runs.json` `notes`)
- Output size: height/width only give the aspect ratio; w = round(sqrt(max_area * w/h)),
  h = round(sqrt(max_area / (w/h))), floored to 16 (512x768 at the default max_area gives 1248x832).
  The inpaint pipeline then overwrites the output size with the photo's (resized) size.
- Photo: floored to 16 by `get_default_height_width` BEFORE its aspect ratio is taken (sides < 16
  give a division by zero); with auto-resize the closest preferred resolution (ties: smaller w,
  then h) and one PIL lanczos resize from the original photo. VAE encode uses the mode (mean), no
  random draw. mu is computed from the output tokens only (reference tokens not counted).
- Ids: image_ids = the photo's grid ids with id[0] = 1, appended after latent_ids; txt_ids zeros.
  latent_ids/image_ids have the prompt embeddings' dtype (T5's) and txt_ids CLIP's dtype, so they
  are bfloat16 in the bf16 run (positions exact up to 256). guidance is always float32
  (`torch.full(..., dtype=float32)`, cast by the transformer); timestep = t cast to the latents'
  dtype, then / 1000 (so bf16-rounded in the bf16 run). `io_dtypes` records each tensor's dtype.
- Inpaint: the packed mask is per feature (16 channels x 2x2 latent pixels per token), so a token
  can be partly masked ({MIXED_NOTE}); a second random draw (VAE sample of the masked photo) is made
  and thrown away; after the last step the unmasked features equal image_latents exactly.
- The BFL file cannot be loaded by stock `from_single_file` on this width (split sizes
  [3072, 3072, 3072, 12288] hard-coded); the script patches that one line (gen_gguf).
"""
    (OUT / "README.md").write_text(text)


if __name__ == "__main__":
    main()
