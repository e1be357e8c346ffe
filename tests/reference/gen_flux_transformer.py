"""Fixtures for the FLUX transformer parity tests (crates/icedit-flux/tests/parity.rs).

For each tiny random config of the real FluxTransformer2DModel structure this writes, under
tests/fixtures/flux/<name>/:
  transformer/              the model saved by diffusers (config.json + safetensors, sharded for one)
  flux1-bfl.safetensors     the same weights under BFL single-file names (fused qkv / linear1,
                            swapped final-layer halves); checked by running diffusers' own BFL
                            converter on it and getting the diffusers weights back exactly
  io.safetensors            inputs and diffusers' outputs in f32, bf16 and f16
  reference.json            versions, grid size, and the reference's own bf16/f16 error vs f32

Run (from the repo root, in the reference venv, see README):
  .venv-ref/bin/python tests/reference/gen_flux_transformer.py
"""

import inspect
import json
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "flux"

CONFIGS = [
    # Fill-shaped (384 -> 64), diptych grid 4 x 8 (width twice the height), batch 2.
    dict(
        name="fill_diptych",
        seed=1,
        model=dict(
            in_channels=384, out_channels=64, num_layers=2, num_single_layers=4,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
            pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=[4, 6, 6],
        ),
        grid=(4, 8), txt_len=6, batch=2, shard=None, bfl_prefix="",
    ),
    # dev-shaped (64 -> 64, out_channels unset), odd grid 5 x 3, 3 heads of 8, sharded weights.
    dict(
        name="dev_sharded",
        seed=2,
        model=dict(
            in_channels=64, out_channels=None, num_layers=1, num_single_layers=2,
            attention_head_dim=8, num_attention_heads=3, joint_attention_dim=20,
            pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=[2, 2, 4],
        ),
        grid=(5, 3), txt_len=4, batch=1, shard="64KB", bfl_prefix="",
    ),
    # No guidance embedding (schnell-like), 4 heads of 10, grid 6 x 10, ComfyUI-prefixed BFL file.
    dict(
        name="noguidance_wide",
        seed=3,
        model=dict(
            in_channels=64, out_channels=64, num_layers=3, num_single_layers=1,
            attention_head_dim=10, num_attention_heads=4, joint_attention_dim=16,
            pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=[2, 4, 4],
        ),
        grid=(6, 10), txt_len=8, batch=1, shard=None, bfl_prefix="model.diffusion_model.",
    ),
]


def randomize_norms(model):
    """RMSNorm scales away from 1 so that a port that drops them cannot pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight") and p.ndim == 1:
                p.copy_(0.5 + torch.rand_like(p))
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1)


def to_bfl(sd, hidden):
    """diffusers state dict -> BFL single-file names (inverse of diffusers' converter)."""
    out = {}
    sd = dict(sd)

    def take(name):
        return sd.pop(name)

    def both(dst, src):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = take(f"{src}.{p}")

    both("img_in", "x_embedder")
    both("txt_in", "context_embedder")
    both("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    both("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    both("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    both("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        both("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        both("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    both("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):
        scale, shift = take(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale], dim=0)

    i = 0
    while f"transformer_blocks.{i}.norm1.linear.weight" in sd:
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        both(f"{d}.img_mod.lin", f"{s}.norm1.linear")
        both(f"{d}.txt_mod.lin", f"{s}.norm1_context.linear")
        for p in ("weight", "bias"):
            out[f"{d}.img_attn.qkv.{p}"] = torch.cat(
                [take(f"{s}.attn.to_{x}.{p}") for x in "qkv"], dim=0)
            out[f"{d}.txt_attn.qkv.{p}"] = torch.cat(
                [take(f"{s}.attn.add_{x}_proj.{p}") for x in "qkv"], dim=0)
        out[f"{d}.img_attn.norm.query_norm.scale"] = take(f"{s}.attn.norm_q.weight")
        out[f"{d}.img_attn.norm.key_norm.scale"] = take(f"{s}.attn.norm_k.weight")
        out[f"{d}.txt_attn.norm.query_norm.scale"] = take(f"{s}.attn.norm_added_q.weight")
        out[f"{d}.txt_attn.norm.key_norm.scale"] = take(f"{s}.attn.norm_added_k.weight")
        both(f"{d}.img_attn.proj", f"{s}.attn.to_out.0")
        both(f"{d}.txt_attn.proj", f"{s}.attn.to_add_out")
        both(f"{d}.img_mlp.0", f"{s}.ff.net.0.proj")
        both(f"{d}.img_mlp.2", f"{s}.ff.net.2")
        both(f"{d}.txt_mlp.0", f"{s}.ff_context.net.0.proj")
        both(f"{d}.txt_mlp.2", f"{s}.ff_context.net.2")
        i += 1

    i = 0
    while f"single_transformer_blocks.{i}.norm.linear.weight" in sd:
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for p in ("weight", "bias"):
            out[f"{d}.linear1.{p}"] = torch.cat(
                [take(f"{s}.attn.to_{x}.{p}") for x in "qkv"] + [take(f"{s}.proj_mlp.{p}")], dim=0)
        both(f"{d}.linear2", f"{s}.proj_out")
        both(f"{d}.modulation.lin", f"{s}.norm.linear")
        out[f"{d}.norm.query_norm.scale"] = take(f"{s}.attn.norm_q.weight")
        out[f"{d}.norm.key_norm.scale"] = take(f"{s}.attn.norm_k.weight")
        i += 1

    assert not sd, f"unconverted tensors: {sorted(sd)}"
    return out


def diffusers_bfl_converter(hidden):
    """diffusers' own BFL -> diffusers converter, with its hard-coded 3072 hidden size replaced."""
    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    src = src.replace("inner_dim = 3072", f"inner_dim = {hidden}")
    scope = dict(vars(single_file_utils))
    exec(src, scope)
    return scope["convert_flux_transformer_checkpoint_to_diffusers"]


def image_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def run(model, inputs, dtype):
    m = model.to(dtype)
    cast = {k: (v.to(dtype) if k not in ("img_ids", "txt_ids") else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = m(
            hidden_states=cast["img"],
            encoder_hidden_states=cast["txt"],
            pooled_projections=cast["pooled"],
            timestep=cast["timestep"],
            img_ids=cast["img_ids"],
            txt_ids=cast["txt_ids"],
            guidance=cast.get("guidance"),
            return_dict=False,
        )[0]
    model.to(torch.float32)
    return out.float()


def generate(spec):
    torch.manual_seed(spec["seed"])
    cfg = spec["model"]
    model = FluxTransformer2DModel(**cfg).eval()
    randomize_norms(model)
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]

    out_dir = OUT / spec["name"]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "transformer").mkdir(parents=True)
    save_kw = dict(safe_serialization=True)
    if spec["shard"]:
        save_kw["max_shard_size"] = spec["shard"]
    model.save_pretrained(out_dir / "transformer", **save_kw)

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    bfl = to_bfl(sd, hidden)
    back = diffusers_bfl_converter(hidden)({k: v.clone() for k, v in bfl.items()})
    assert set(back) == set(sd), set(back) ^ set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    save_file({spec["bfl_prefix"] + k: v.contiguous() for k, v in bfl.items()},
              out_dir / "flux1-bfl.safetensors")

    b, (h, w), L = spec["batch"], spec["grid"], spec["txt_len"]
    inputs = dict(
        img=torch.randn(b, h * w, cfg["in_channels"]),
        img_ids=image_ids(h, w),
        txt=torch.randn(b, L, cfg["joint_attention_dim"]),
        txt_ids=torch.zeros(L, 3),
        pooled=torch.randn(b, cfg["pooled_projection_dim"]),
        timestep=torch.rand(b) * 0.9 + 0.05,
    )
    if cfg["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([30.0, 50.0][:b]) / 1000
    outs = {f"out_{n}": run(model, inputs, dt)
            for n, dt in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16))}
    save_file({**{k: v.contiguous() for k, v in inputs.items()}, **outs}, out_dir / "io.safetensors")

    err = {n: (outs[f"out_{n}"] - outs["out_f32"]).abs().max().item() for n in ("bf16", "f16")}
    meta = dict(
        generator="tests/reference/gen_flux_transformer.py",
        diffusers=diffusers.__version__, torch=torch.__version__,
        grid=[h, w], txt_len=L, batch=b, bfl_prefix=spec["bfl_prefix"],
        sharded=bool(spec["shard"]),
        reference_max_abs_err_vs_f32=err,
        out_max_abs=outs["out_f32"].abs().max().item(),
    )
    (out_dir / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(spec["name"], json.dumps(meta["reference_max_abs_err_vs_f32"]))


if __name__ == "__main__":
    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    for spec in CONFIGS:
        generate(spec)
