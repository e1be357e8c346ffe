"""Fixtures for the FLUX.1 Fill pipeline tests (icedit-text, icedit-flux VAE, icedit-pipeline, CLI).

Builds a complete tiny pipeline folder in the exact diffusers layout of
black-forest-labs/FLUX.1-Fill-dev, with random weights, and records diffusers' outputs:

tests/fixtures/fill_pipeline/
  tiny/                       the pipeline folder (what `icedit fill --model` loads)
    model_index.json
    transformer/              FluxTransformer2DModel, Fill-shaped (384 -> 64), sharded + index
    vae/                      AutoencoderKL, 16 latent channels, scale factor 8, no quant convs
    text_encoder/             CLIPTextModel (pooled output used)
    text_encoder_2/           T5EncoderModel, sharded + index
    tokenizer/                CLIP BPE as vocab.json + merges.txt (no tokenizer.json, as the real repo)
    tokenizer_2/              T5 Unigram tokenizer.json
    scheduler/                FlowMatchEulerDiscreteScheduler config (the real one)
    ae.safetensors            the same VAE under BFL/LDM names (the real repo ships one too)
  reference/
    tokens.json               prompts -> CLIP ids (77, padded) and T5 ids (padded), truncation flags
    text.safetensors          T5 states and CLIP pooled output per prompt
    vae.safetensors           VAE encode (mean, logvar, seeded sample) and decode
    scheduler.json            sigmas and timesteps for several step counts and sizes
    runs.json                 full pipeline runs: parameters
    <run>/image.png, mask.png, [latents.safetensors], out.png, io.safetensors

Run (from the repo root, in the reference venv, see README):
  .venv-ref/bin/python tests/reference/gen_fill_pipeline.py
"""

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import tokenizers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxTransformer2DModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift, retrieve_timesteps
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "fill_pipeline"
TINY = OUT / "tiny"
REF = OUT / "reference"

# The FLUX.1-Fill-dev scheduler config, verbatim.
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

CORPUS = """
A diptych with two side-by-side images of the same scene. On the right, the scene is exactly
the same as on the left but make it night. Give him a red scarf. Turn the sky into a sunset,
add snow on the roofs, remove the car, replace the dog with a cat, make it look like a
watercolor painting. The quick brown fox jumps over the lazy dog! It's 3 o'clock; we're
ready, aren't we? Café, naïve, résumé, Straße, 東京, 日本語のテキスト, emoji 🎉🔥.
A photo of a cozy living room with a fireplace, wooden floor and large windows, in 4k.
Numbers 1234567890 and symbols @#$%^&*()[]{}<>/\\|~`+=_-.
"""

PROMPTS = [
    "make it night",
    "A diptych with two side-by-side images of the same scene. On the right, the scene is "
    "exactly the same as on the left but give him a red scarf",
    "  Café   NAÏVE\tnaïve\n東京 🎉 it's they're  ",
    "Turn the sky into a sunset!!! (and add snow), 1234 -- ok?",
    # Longer than 77 CLIP tokens and than the T5 limits used below: truncation is reported.
    "a photo of a cozy living room with a fireplace, wooden floor and large windows " * 8,
    "x",
]


def seeded(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def randomize(model, scale_1d=True):
    """Norm scales away from 1 and visible biases, so a port that drops a term cannot pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(0.5 + torch.rand_like(p))
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def build_clip_tokenizer(folder: Path):
    """A small BPE in CLIP's exact format: byte alphabet, `</w>` word ends, vocab ordered as
    CLIP's (bytes, bytes + </w>, merges, <|startoftext|>, <|endoftext|>) so that the end token has
    the largest id, as in the real vocab (CLIP's pooled output relies on argmax of the ids)."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([CORPUS] * 4, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab_list = alphabet + [a + "</w>" for a in alphabet]
    seen = set(vocab_list)
    kept = []
    for a, b in merges:
        token = a + b
        if token in seen:
            continue
        seen.add(token)
        vocab_list.append(token)
        kept.append((a, b))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8"
    )
    # The real repo's files (trimmed to what matters).
    special = {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": dict(special, content="<|startoftext|>"),
                "eos_token": dict(special, content="<|endoftext|>"),
                "pad_token": "<|endoftext|>",
                "unk_token": dict(special, content="<|endoftext|>"),
            },
            indent=2,
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "bos_token": "<|startoftext|>",
                "clean_up_tokenization_spaces": True,
                "do_lower_case": True,
                "eos_token": "<|endoftext|>",
                "errors": "replace",
                "model_max_length": 77,
                "pad_token": "<|endoftext|>",
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": "<|endoftext|>",
            },
            indent=2,
        )
    )
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.eos_token_id == len(vocab) - 1, (tok.eos_token_id, len(vocab))
    assert not (folder / "tokenizer.json").exists()
    return tok


def build_t5_tokenizer(folder: Path):
    """A small Unigram tokenizer in the T5 fast tokenizer's format (Metaspace, `</s>` appended)."""
    uni = Tokenizer(models.Unigram())
    uni.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    uni.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    uni.train_from_iterator([CORPUS] * 4, trainer)
    uni.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    from tokenizers import decoders

    uni.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    folder.mkdir(parents=True)
    uni.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2)
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "clean_up_tokenization_spaces": True,
                "eos_token": "</s>",
                "extra_ids": 0,
                "model_max_length": 512,
                "pad_token": "<pad>",
                "tokenizer_class": "T5Tokenizer",
                "unk_token": "<unk>",
            },
            indent=2,
        )
    )
    return T5TokenizerFast.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# Models


def build_text_encoders(clip_vocab, t5_vocab):
    seeded(10)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=32,
            intermediate_size=48,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            # As in openai/clip-vit-large-patch14: the legacy id makes the pooler take argmax(ids).
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    ).eval()
    randomize(clip)
    seeded(11)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            layer_norm_epsilon=1e-6,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    randomize(t5)
    with torch.no_grad():
        # Real T5 activations are large; keep ours well away from zero too.
        t5.shared.weight.mul_(4.0)
    return clip, t5


def build_vae():
    seeded(12)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        force_upcast=True,
    ).eval()
    randomize(vae)
    return vae


def build_transformer(joint_dim, pooled_dim):
    seeded(13)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=384,
        out_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    ).eval()
    randomize(model)
    with torch.no_grad():
        # Random init leaves proj_out tiny; a visible velocity makes every step count.
        model.proj_out.weight.mul_(20.0)
    return model


def vae_to_ldm(vae):
    """diffusers AutoencoderKL state dict -> BFL `ae.safetensors` (LDM) names, checked by
    converting back with diffusers' own converter."""
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    n_blocks = len(vae.config.block_out_channels)
    out = {}

    def resnet(src, dst):
        for a, b in [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                     ("conv_shortcut", "nin_shortcut")]:
            for p in ("weight", "bias"):
                key = f"{src}.{a}.{p}"
                if key in sd:
                    out[f"{dst}.{b}.{p}"] = sd.pop(key)

    def attention(src, dst):
        for a, b in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                     ("to_out.0", "proj_out")]:
            w = sd.pop(f"{src}.{a}.weight")
            out[f"{dst}.{b}.weight"] = w if w.ndim == 1 else w[:, :, None, None]
            out[f"{dst}.{b}.bias"] = sd.pop(f"{src}.{a}.bias")

    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            for p in ("weight", "bias"):
                out[f"{part}.{name}.{p}"] = sd.pop(f"{part}.{name}.{p}")
        for p in ("weight", "bias"):
            out[f"{part}.norm_out.{p}"] = sd.pop(f"{part}.conv_norm_out.{p}")
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        attention(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1")
    for i in range(n_blocks):
        for j in range(vae.config.layers_per_block):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        for p in ("weight", "bias"):
            key = f"encoder.down_blocks.{i}.downsamplers.0.conv.{p}"
            if key in sd:
                out[f"encoder.down.{i}.downsample.conv.{p}"] = sd.pop(key)
        ldm = n_blocks - 1 - i  # LDM numbers decoder levels from the bottom
        for j in range(vae.config.layers_per_block + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm}.block.{j}")
        for p in ("weight", "bias"):
            key = f"decoder.up_blocks.{i}.upsamplers.0.conv.{p}"
            if key in sd:
                out[f"decoder.up.{ldm}.upsample.conv.{p}"] = sd.pop(key)
    assert not sd, f"unmapped VAE tensors: {sorted(sd)}"

    back = convert_ldm_vae_checkpoint(dict(out), vae.config)
    ref = vae.state_dict()
    assert set(back) == set(ref), set(back) ^ set(ref)
    for k in ref:
        assert torch.equal(back[k].reshape(ref[k].shape), ref[k]), k
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Inputs


def test_image(height, width, seed):
    """A smooth pattern with some texture: deterministic and not trivially flat."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack(
        [
            128 + 100 * np.sin(x / 5.0 + seed),
            128 + 100 * np.cos(y / 7.0 - seed),
            128 + 60 * np.sin((x + y) / 9.0),
        ],
        axis=-1,
    )
    img = img + rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def rect_mask(height, width, box):
    m = np.zeros((height, width), np.uint8)
    top, left, bottom, right = box
    m[top:bottom, left:right] = 255
    return Image.fromarray(m, "L")


def expand_canvas(image, left, top, right, bottom):
    """Outpainting as icedit does it: a bigger canvas, the source pasted in, the new area masked.
    The new area's pixel values do not matter (the pipeline zeroes masked pixels), gray here."""
    w, h = image.size
    canvas = Image.new("RGB", (w + left + right, h + top + bottom), (127, 127, 127))
    canvas.paste(image, (left, top))
    mask = np.full((h + top + bottom, w + left + right), 255, np.uint8)
    mask[top : top + h, left : left + w] = 0
    return canvas, Image.fromarray(mask, "L")


# ---------------------------------------------------------------------------------------------


def main():
    torch.set_num_threads(2)
    if OUT.exists():
        shutil.rmtree(OUT)
    TINY.mkdir(parents=True)
    REF.mkdir(parents=True)

    clip_tok = build_clip_tokenizer(TINY / "tokenizer")
    t5_tok = build_t5_tokenizer(TINY / "tokenizer_2")
    clip, t5 = build_text_encoders(len(clip_tok), len(t5_tok))
    vae = build_vae()
    transformer = build_transformer(t5.config.d_model, clip.config.hidden_size)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)

    clip.save_pretrained(TINY / "text_encoder")
    t5.save_pretrained(TINY / "text_encoder_2", max_shard_size="40KB")
    vae.save_pretrained(TINY / "vae")
    transformer.save_pretrained(TINY / "transformer", max_shard_size="200KB")
    (TINY / "scheduler").mkdir()
    (TINY / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    save_file(vae_to_ldm(vae), TINY / "ae.safetensors")
    (TINY / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxFillPipeline",
                "_diffusers_version": diffusers.__version__,
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "FluxTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        )
    )
    for sub in ("transformer", "text_encoder_2"):
        assert any((TINY / sub).glob("*.index.json")), f"{sub} should be sharded like the real repo"

    # Load back exactly as a user would, from the folder.
    pipe = FluxFillPipeline.from_pretrained(TINY, torch_dtype=torch.float32)
    assert pipe.vae_scale_factor == 8

    # --- tokens and text embeddings ------------------------------------------------------------
    tokens = []
    text = {}
    for i, prompt in enumerate(PROMPTS):
        clip_ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        clip_full = pipe.tokenizer(prompt).input_ids
        entry = {
            "prompt": prompt,
            "clip_ids": clip_ids,
            "clip_untruncated_len": len(clip_full),
            "t5": {},
        }
        for max_len in (16, 512):
            ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=max_len, truncation=True).input_ids
            full = pipe.tokenizer_2(prompt).input_ids
            entry["t5"][str(max_len)] = {"ids": ids, "untruncated_len": len(full)}
        tokens.append(entry)
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=16)
        text[f"t5_{i}"] = embeds[0].contiguous()
        text[f"clip_pooled_{i}"] = pooled[0].contiguous()
    (REF / "tokens.json").write_text(json.dumps(tokens, indent=1, ensure_ascii=False))
    save_file(text, REF / "text.safetensors")

    # --- VAE ---------------------------------------------------------------------------------
    img = test_image(32, 48, 5)
    img.save(REF / "vae_input.png")
    x = pipe.image_processor.preprocess(img, height=32, width=48).to(torch.float32)
    with torch.no_grad():
        dist = pipe.vae.encode(x).latent_dist
        sample = dist.sample(torch.Generator("cpu").manual_seed(7))
        z = torch.randn(1, 16, 4, 6, generator=torch.Generator("cpu").manual_seed(8))
        decoded = pipe.vae.decode(z).sample
    save_file(
        {
            "input": x.contiguous(),
            "mean": dist.mean.contiguous(),
            "logvar": dist.logvar.contiguous(),
            "sample_seed7": sample.contiguous(),
            "decode_input": z.contiguous(),
            "decoded": decoded.contiguous(),
        },
        REF / "vae.safetensors",
    )

    # --- scheduler ---------------------------------------------------------------------------
    schedules = []
    for steps, height, width in [(4, 64, 48), (28, 512, 1024), (50, 1024, 1024), (50, 1024, 2048),
                                 (1, 16, 16), (7, 720, 1280)]:
        sigmas = np.linspace(1.0, 1 / steps, steps)
        seq = (height // 16) * (width // 16)
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        sched = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        timesteps, _ = retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
        schedules.append(
            {
                "steps": steps, "height": height, "width": width, "mu": mu,
                "sigmas": sched.sigmas.tolist(), "timesteps": timesteps.tolist(),
            }
        )
    (REF / "scheduler.json").write_text(json.dumps(schedules, indent=1))

    # --- full pipeline runs --------------------------------------------------------------------
    runs = []

    def run(name, image, mask, seed, steps, guidance, prompt, max_len, given_latents, dtype="float32"):
        folder = REF / name
        folder.mkdir()
        image.save(folder / "image.png")
        mask.save(folder / "mask.png")
        width, height = image.size
        p = pipe if dtype == "float32" else FluxFillPipeline.from_pretrained(TINY, torch_dtype=getattr(torch, dtype))
        kwargs = {}
        if given_latents:
            g = torch.Generator("cpu").manual_seed(seed + 1000)
            latents = torch.randn(1, 16, height // 8, width // 8, generator=g)
            save_file({"latents": latents.contiguous()}, folder / "latents.safetensors")
            kwargs["latents"] = p._pack_latents(latents, 1, 16, height // 8, width // 8).to(getattr(torch, dtype))
        captured = {}

        def grab(pipeline, i, t, cb):
            captured.setdefault("first_latents", cb["latents"])
            return {}

        with torch.no_grad():
            result = p(
                prompt=prompt,
                image=image,
                mask_image=mask,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                max_sequence_length=max_len,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",
                **kwargs,
            ).images[0]
            latents_out = p(
                prompt=prompt, image=image, mask_image=mask, height=height, width=width,
                num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=max_len,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kwargs,
            ).images
        png = Image.fromarray((result * 255).round().astype(np.uint8))
        png.save(folder / "out.png")
        save_file(
            {"image": torch.from_numpy(np.ascontiguousarray(result)), "final_latents": latents_out.float().contiguous()},
            folder / "io.safetensors",
        )
        runs.append(
            {
                "name": name, "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance,
                "max_sequence_length": max_len, "height": height, "width": width,
                "given_latents": given_latents, "dtype": dtype,
            }
        )

    src = test_image(48, 64, 1)
    run("inpaint_latents", src, rect_mask(48, 64, (8, 16, 40, 48)), 3, 3, 30.0,
        "give him a red scarf", 16, True)
    run("inpaint_seed", test_image(64, 32, 2), rect_mask(64, 32, (0, 0, 32, 32)), 11, 4, 30.0,
        "make it night", 16, False)
    small = test_image(32, 32, 3)
    canvas, outpaint_mask = expand_canvas(small, 16, 0, 16, 16)
    run("outpaint_seed", canvas, outpaint_mask, 5, 3, 30.0, "a wide landscape", 16, False)
    run("inpaint_latents_bf16", src, rect_mask(48, 64, (8, 16, 40, 48)), 3, 3, 30.0,
        "give him a red scarf", 16, True, dtype="bfloat16")
    (REF / "runs.json").write_text(
        json.dumps(
            {
                "versions": {
                    "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                },
                "outpaint_seed": {"source": "outpaint_source.png", "expand_ltrb": [16, 0, 16, 16]},
                "runs": runs,
            },
            indent=1,
        )
    )
    small.save(REF / "outpaint_seed" / "outpaint_source.png")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
