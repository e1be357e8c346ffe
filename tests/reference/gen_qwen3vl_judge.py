"""Fixture for the in-process Qwen3-VL judge: a tiny random Qwen3VLForConditionalGeneration with
its tokenizer and processor, three images, the judge prompt, and transformers' prefill outputs.

tests/fixtures/qwen3vl/
  model/               a Hub-like repo: config.json, model.safetensors (f32, tied lm_head, so no
                       lm_head.weight), tokenizer.json, tokenizer_config.json, chat_template.jinja
                       (the real Qwen3-VL-Instruct template), processor_config.json (5.23 layout,
                       image processor nested) and preprocessor_config.json (image processor alone)
  images/              first.png 64x64, second.png 96x64, original.png 70x50 (w x h)
  prompt.txt           the chat-templated text before the processor expands <|image_pad|>
  expected.safetensors input_ids, pixel_values, image_grid_thw, position_ids, rope_deltas,
                       vision_patch_embeds, vision_pos_embeds (first image), vision_hidden
                       (last block, before the merger), image_embeds, deepstack.{0,1},
                       inputs_embeds, layer_out.{0,1,2} (decoder layer outputs, before the
                       deepstack add), hidden_last, logits_last, token_ids_12
  meta.json            configs, grids, resized sizes, token ids, the "1"/"2" logits, smart_resize cases

The model: torch.manual_seed(0) init, then every parameter += N(0, 0.02) (matrices) or
N(0, 0.1) (vectors: norms, biases), from a generator seeded 1. Eager attention, f32.
The tokenizer: a byte-level BPE trained on the prompt (vocab 400) with the Qwen2 pre-tokenizer,
then the 7 special tokens (ids 400..406). The processor: Qwen3VLProcessor with the PIL image
processor (torchvision is not installed; its missing video processor is patched around).

Run: .venv-ref/bin/python tests/reference/gen_qwen3vl_judge.py (from the repo root)
"""

import hashlib
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import PIL
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.processing_utils import ProcessorMixin
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "qwen3vl"
MODEL = OUT / "model"
IMAGES = OUT / "images"
INSTRUCTION = "make it night"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
PATCH, MERGE, TEMPORAL = 16, 2, 2
MIN_PIXELS, MAX_PIXELS = 32 * 32 * 2, 32 * 32 * 5  # "second" goes over MAX_PIXELS and is shrunk
IMAGE_SIZES = {"first": (64, 64), "second": (96, 64), "original": (70, 50)}  # (w, h)

# The chat template of Qwen/Qwen3-VL-8B-Instruct (byte for byte: 5292 bytes, SHA-256 below).
CHAT_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def judge_prompt():
    # Exactly as the Rust side: PAIRWISE_TEMPLATE.replace("{instruction}", ..), trailing "\n" kept.
    return (ROOT / "prompts" / "judge-pairwise.txt").read_text().replace("{instruction}", INSTRUCTION)


def build_tokenizer(prompt):
    """Byte-level BPE with Qwen2's normalizer and pre-tokenizer, trained on the prompt."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([prompt, "user\nassistant\n"], trainer)
    trained = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                         unk_token=None, eos_token=SPECIAL[0], pad_token=SPECIAL[0])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL[1:]])
    tok.eos_token = "<|im_end|>"  # as Qwen3-VL-Instruct; ids stay in SPECIAL order
    ids = tok.convert_tokens_to_ids(SPECIAL)
    assert ids == list(range(len(trained["vocab"]), len(trained["vocab"]) + len(SPECIAL))), ids
    for digit in "12":
        assert len(tok.encode(digit, add_special_tokens=False)) == 1
    return tok


def build_processor(tok):
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, patch_size=PATCH,
        temporal_patch_size=TEMPORAL, merge_size=MERGE, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # Quirk: Qwen3VLProcessor insists on a video processor, and every video processor needs
    # torchvision. Accept None for it (images only).
    check = ProcessorMixin.check_argument_for_proper_class
    lenient = lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                chat_template=CHAT_TEMPLATE)


def save_processor(processor):
    images_only = classmethod(lambda cls: ["image_processor", "tokenizer"])
    with mock.patch.object(Qwen3VLProcessor, "get_attributes", images_only):
        processor.save_pretrained(MODEL)
    processor.image_processor.save_pretrained(MODEL)  # preprocessor_config.json, as Hub repos have


def build_model(tok):
    ids = dict(zip(SPECIAL, tok.convert_tokens_to_ids(SPECIAL)))
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
            rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[4, 2, 2],
                                 mrope_interleaved=True)),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=PATCH,
            temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, in_channels=3, out_hidden_size=64,
            num_position_embeddings=64, deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh"),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).float().eval()
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # the tied embedding / lm_head comes once
            p.add_(torch.randn(p.shape, generator=noise) * (0.1 if p.ndim == 1 else 0.02))
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert config.vision_config._attn_implementation == config.text_config._attn_implementation == "eager"
    return model


def make_image(w, h, rng):
    """A gradient, a rectangle, a disc and noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 128 + 100 * np.sin((x + 2 * y) / 6)], -1)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
    cx, cy, r = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4), min(w, h) // 5
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def reference_pos_embeds(table, h, w):
    """Qwen's original fast_pos_embed_interpolate for one image: bilinear (align_corners) resize of
    the square table to (h, w), then rows reordered into 2x2 merge-window order."""
    side = int(table.shape[0] ** 0.5)
    grid = table.T.reshape(1, -1, side, side)
    up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[0]  # (C, h, w)
    up = up.reshape(-1, h // MERGE, MERGE, w // MERGE, MERGE).permute(1, 3, 2, 4, 0)
    return up.reshape(h * w, -1)


def expand_pads(text, grid_thw):
    for t, h, w in grid_thw.tolist():
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // MERGE**2), 1)
    return text.replace("<|placeholder|>", "<|image_pad|>")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    IMAGES.mkdir(parents=True)
    assert hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest() == CHAT_TEMPLATE_SHA256
    prompt = judge_prompt()
    tok = build_tokenizer(prompt)
    processor = build_processor(tok)
    model = build_model(tok)
    model.save_pretrained(MODEL)
    save_processor(processor)

    rng = np.random.default_rng(0)
    images = []
    for name, (w, h) in IMAGE_SIZES.items():
        make_image(w, h, rng).save(IMAGES / f"{name}.png")
        images.append(Image.open(IMAGES / f"{name}.png").convert("RGB"))

    messages = [{"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    by_hand = ("<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 3 + prompt
               + "<|im_end|>\n<|im_start|>assistant\n")
    assert text == by_hand, (text, by_hand)
    (OUT / "prompt.txt").write_text(text)

    inputs = processor(text=[text], images=images, return_tensors="pt")
    input_ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    L = input_ids.shape[1]
    file_ids = Tokenizer.from_file(str(MODEL / "tokenizer.json")).encode(
        expand_pads(text, grid), add_special_tokens=False).ids
    assert file_ids == input_ids[0].tolist(), "tokenizer.json disagrees with the processor"
    reloaded = transformers.AutoTokenizer.from_pretrained(MODEL)
    assert reloaded(expand_pads(text, grid))["input_ids"] == file_ids
    # The saved image processor config reproduces the pixels (AutoProcessor itself needs torchvision).
    saved = transformers.AutoImageProcessor.from_pretrained(MODEL)(images, return_tensors="pt")
    assert torch.equal(saved["pixel_values"], inputs["pixel_values"])
    # The first image (64x64) is not resized: its rows are the normalized pixels, (C, T, 16, 16)
    # per patch, patches in 2x2 merge-window order, the frame repeated for T = 2.
    x = (np.asarray(images[0]).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = ((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)  # (C, H, W)
    x = x.reshape(3, 2, MERGE, PATCH, 2, MERGE, PATCH).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.repeat(x[:, :, :, :, :, None], TEMPORAL, axis=5).reshape(16, -1)
    assert grid[0].tolist() == [1, 4, 4] and np.array_equal(inputs["pixel_values"][:16].numpy(), x)

    token_ids_12 = torch.tensor(tok.convert_tokens_to_ids(["1", "2"]), dtype=torch.long)
    visual = model.model.visual
    captured = {}
    hooks = [visual.patch_embed.register_forward_hook(lambda m, i, o: captured.update(patch=o.detach().clone()))]
    for n, layer in enumerate(model.model.language_model.layers):  # decoder layer outputs (pre-deepstack)
        hooks.append(layer.register_forward_hook(lambda m, i, o, n=n: captured.update({n: o[0].detach().clone()})))
    with torch.no_grad():
        position_ids, rope_deltas = model.model.get_rope_index(
            input_ids, inputs["mm_token_type_ids"], image_grid_thw=grid, attention_mask=inputs["attention_mask"])
        vis = model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
        image_embeds = torch.cat(vis.pooler_output)
        deepstack = [torch.cat(level) for level in vis.deepstack_features]
        idx, wts = get_vision_interpolation_indices_and_weights(
            grid[:1], visual.num_grid_per_side, mode="bilinear", align_corners=True, spatial_merge_size=MERGE)
        pos_first = (visual.pos_embed(idx) * wts[:, :, None]).sum(1)
        ref = reference_pos_embeds(visual.pos_embed.weight, *grid[0, 1:].tolist())
        assert torch.allclose(pos_first, ref, atol=1e-6), (pos_first - ref).abs().max()
        out = model(**inputs, use_cache=False, output_hidden_states=True)
        for hook in hooks:
            hook.remove()
        again = model(**inputs, use_cache=False)
        assert torch.equal(out.logits, again.logits), "forward is not deterministic"
        hidden_last = model.model(**inputs, use_cache=False).last_hidden_state[0, -1]
        logits_last = out.logits[0, -1]
        assert torch.allclose(model.lm_head(hidden_last), logits_last, atol=1e-6)
        reloaded_model = Qwen3VLForConditionalGeneration.from_pretrained(MODEL, attn_implementation="eager")
        assert torch.equal(reloaded_model(**inputs, use_cache=False).logits, out.logits)

    expected = {
        "input_ids": input_ids, "pixel_values": inputs["pixel_values"], "image_grid_thw": grid,
        "position_ids": position_ids, "rope_deltas": rope_deltas,
        "vision_patch_embeds": captured["patch"], "vision_pos_embeds": pos_first,
        "vision_hidden": vis.last_hidden_state, "image_embeds": image_embeds,
        **{f"deepstack.{i}": d for i, d in enumerate(deepstack)},
        "inputs_embeds": out.hidden_states[0][0],  # token embeddings, image pads replaced by image_embeds
        **{f"layer_out.{i}": captured[i] for i in range(len(model.model.language_model.layers))},
        "hidden_last": hidden_last, "logits_last": logits_last, "token_ids_12": token_ids_12,
    }
    expected = {k: v.contiguous() for k, v in expected.items()}
    save_file(expected, OUT / "expected.safetensors")

    resized = [list(smart_resize(h, w, PATCH * MERGE, MIN_PIXELS, MAX_PIXELS)) for w, h in IMAGE_SIZES.values()]
    cases = [(50, 70), (48, 80), (80, 48), (16, 16), (33, 1000), (500, 300), (112, 112)]
    logit_12 = logits_last[token_ids_12].tolist()
    meta = dict(
        versions=dict(transformers=transformers.__version__, torch=torch.__version__,
                      tokenizers=tokenizers.__version__, pillow=PIL.__version__),
        prompt_text=prompt, L=L, special_token_ids=dict(zip(SPECIAL, tok.convert_tokens_to_ids(SPECIAL))),
        token_ids_12=token_ids_12.tolist(), logits_12=logit_12, judge_prefers=1 if logit_12[0] >= logit_12[1] else 2,
        images={n: dict(size_wh=list(s), resized_hw=r, grid_thw=g) for (n, s), r, g
                in zip(IMAGE_SIZES.items(), resized, grid.tolist())},
        smart_resize=dict(factor=PATCH * MERGE, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                          resample="PIL BICUBIC on uint8 RGB", cases_hw=[
                              dict(hw=list(c), out_hw=list(smart_resize(*c, PATCH * MERGE, MIN_PIXELS, MAX_PIXELS)))
                              for c in cases]),
        noise="p += N(0, 0.02) for matrices, N(0, 0.1) for vectors, torch.Generator seeded 1",
        shapes={k: list(v.shape) for k, v in expected.items()},
        config=model.config.to_dict(), processor=json.loads((MODEL / "processor_config.json").read_text()),
    )
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, default=str))

    print(json.dumps(dict(text_config=model.config.text_config.to_dict(),
                          vision_config=model.config.vision_config.to_dict()), indent=1, default=str))
    for k, v in expected.items():
        print(f"{k:22s} {str(v.dtype):14s} {tuple(v.shape)}")
    print("L =", L, "grid_thw =", grid.tolist(), "resized (h, w) =", resized)
    print("ids of '1','2':", token_ids_12.tolist(), "logits:", logit_12)
    print("rope_deltas:", rope_deltas.tolist())
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
