"""bf16 edits: the precision users run by default, with each adapter kind.

  .venv-ref/bin/python tests/reference/gen_edit_bf16.py    (after gen_edit_adapters.py)

diffusers' FluxFillPipeline in bfloat16 on the same diptych, prompt and seed as the f32 runs of
gen_edit_adapters.py, with the PEFT LoRA and with the MoE-LoRA (PEFT for its plain layers, the
Python MoE reference cast to bf16 for the expert layers). Records the PNGs and how far
diffusers' own bf16 result is from its f32 one, the yardstick for the Rust test.
Writes tests/fixtures/edit/bf16/<run>/edit.png + runs.json.
"""

import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import gen_edit_adapters as ref

OUT = ref.OUT / "bf16"
RUNS = [("lora_peft", "peft"), ("moe", "moe")]


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    moe_sd = load_file(ref.ADAPTERS / "moe_lora.safetensors")
    dip = Image.open(ref.OUT / "diptych.png")
    mask = Image.open(ref.OUT / "mask.png")
    runs = []
    for name, kind in RUNS:
        pipe = ref.FluxFillPipeline.from_pretrained(ref.TINY, torch_dtype=torch.bfloat16)
        if kind == "peft":
            pipe.load_lora_weights(ref.ADAPTERS / "lora_peft.safetensors", adapter_name="edit")
        else:
            ref.install_moe(pipe, moe_sd, 1)
            pipe.transformer.to(torch.bfloat16)
        out = pipe(prompt=ref.PROMPT, image=dip, mask_image=mask, height=ref.SRC_H,
                   width=2 * ref.SRC_W, num_inference_steps=ref.STEPS,
                   guidance_scale=ref.GUIDANCE, max_sequence_length=ref.MAX_SEQ,
                   generator=torch.Generator("cpu").manual_seed(42)).images[0]
        edit = out.crop((ref.SRC_W, 0, 2 * ref.SRC_W, ref.SRC_H))
        (OUT / name).mkdir(exist_ok=True)
        edit.save(OUT / name / "edit.png")
        f32 = np.asarray(Image.open(ref.RUNS / name / "edit.png"), dtype=int)
        gap = np.abs(np.asarray(edit, dtype=int) - f32)
        runs.append(dict(name=name, adapter_kind=kind, seed=42, steps=ref.STEPS,
                         guidance=ref.GUIDANCE, dtype="bfloat16",
                         reference_bf16_vs_f32_max=int(gap.max()),
                         reference_bf16_vs_f32_mean=float(gap.mean())))
        print(name, "diffusers bf16 vs f32:", gap.max(), gap.mean())
    (OUT / "runs.json").write_text(json.dumps(dict(prompt=ref.PROMPT, runs=runs), indent=1))


if __name__ == "__main__":
    main()
