"""diffusers' side of the GPU check: FLUX.1 Fill's transformer at its real shape with random
weights, made on the GPU in bf16, timed on a 1024x512 diptych's tokens (2048 image + 512 text),
then saved (diffusers layout, with the inputs and its output) for icedit to load the very same
weights and inputs.

  python3 benches/gpu/flux_real.py --out /tmp/flux_real            # on the lent GPU
  python3 benches/gpu/flux_real.py --out /tmp/x --device cpu --small   # a dry run anywhere

Prints seconds per forward (median of --repeat after a warm-up) and peak device memory
(torch.cuda.max_memory_allocated); writes OUT/transformer/ and OUT/io.safetensors.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

FILL = dict(
    patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="2 + 2 blocks, for a dry run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--text-tokens", type=int, default=512)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(FILL)
    if args.small:
        config.update(num_layers=2, num_single_layers=2)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    start = time.time()
    with dev:
        model = FluxTransformer2DModel(**config).to(torch.bfloat16).eval()
    made = time.time() - start
    gh, gw = args.height // 16, args.width // 16
    g = torch.Generator(device="cpu").manual_seed(1)
    img = torch.randn(1, gh * gw, 384, generator=g)
    txt = torch.randn(1, args.text_tokens, 4096, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    img_ids = torch.zeros(gh * gw, 3)
    img_ids[:, 1] = torch.arange(gh).repeat_interleave(gw).float()
    img_ids[:, 2] = torch.arange(gw).repeat(gh).float()
    txt_ids = torch.zeros(args.text_tokens, 3)
    timestep, guidance = torch.tensor([0.5]), torch.tensor([30.0])
    inputs = dict(
        hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled,
        timestep=timestep, guidance=guidance, img_ids=img_ids, txt_ids=txt_ids,
    )
    on_dev = {k: v.to(dev, torch.bfloat16 if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
              for k, v in inputs.items()}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    with torch.no_grad():
        for i in range(args.repeat + 1):
            start = time.time()
            result = model(**on_dev, return_dict=False)[0]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                seconds.append(time.time() - start)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    report = {
        "engine": "diffusers",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "tokens": [gh * gw, args.text_tokens],
        "made_seconds": round(made, 1),
        "forward_median_seconds": statistics.median(seconds),
        "forward_fastest_seconds": min(seconds),
        "peak_device_bytes": peak,
        "attention": "torch SDPA (its default backend)",
    }
    print(json.dumps(report, indent=1))
    start = time.time()
    model.save_pretrained(out / "transformer", safe_serialization=True, max_shard_size="10GB")
    # icedit's names: img, txt, pooled, timestep, guidance, img_ids, txt_ids; `out` to compare.
    named = dict(img=img, txt=txt, pooled=pooled, timestep=timestep, guidance=guidance,
                 img_ids=img_ids, txt_ids=txt_ids, out=result.float().cpu())
    save_file({k: v.contiguous() for k, v in named.items()}, str(out / "io.safetensors"))
    print(f"saved in {time.time() - start:.1f} s", flush=True)
    (out / "diffusers.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
