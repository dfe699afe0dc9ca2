"""The engine's input: one (prompt, image) row as a PreparedPrompt (chat template applied, tokenised, image processed).

`prepare_prompt` is what a user of the engine calls per row; `prepare_prompts` prepares
many rows with one processor call per group of rows (what the job's CPU stage calls for
each block of a dataset, `pipeline/job/preprocess.py`), giving the same PreparedPrompts.
A row that cannot be prepared raises PromptError with a message meant for the row's
`error` (prepare_prompts puts it in the row's place).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

TEXT_KEYS = ("input_ids", "attention_mask")
# Processor classes (and their subclasses) whose outputs for a batch of rows split into exactly what each row alone
# gives (tests/engine/test_prompts.py checks each, bit for bit). Others may pad across a batch (LLaVA-NeXT pads every
# row's image patches to the batch's most) and are called row by row.
BATCHED_PROCESSORS = frozenset({"LlavaProcessor", "Gemma3Processor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor",
                                "QwenVLImageProcessor"})


@dataclass
class PreparedPrompt:
    """One row, tokenised and with its image processed, ready for the engine."""

    input_ids: list[int]
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. pixel_values [1, 3, H, W]
    token_inputs: dict[str, list[int]] = field(default_factory=dict)  # per-token extras, e.g. token_type_ids


class PromptError(ValueError):
    """This row cannot be generated; the message says why."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency over white, 16-bit and float scaled to 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        return Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def build_messages(prompt: str, num_images: int) -> list[dict]:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def prepare_prompt(
    processor,
    prompt: str | None,
    image: Image.Image | list[Image.Image] | None,
    context_length: int | None,
) -> PreparedPrompt:
    """Chat-templated, tokenised prompt with its image(s) processed; raises PromptError for a bad row.

    A prompt that holds the text of one of the model's special tokens (an image placeholder such as
    LLaVA's `<image>`, a chat-turn marker, ...) is refused: the processor would read it as markup, not
    as the user's words, and a placeholder without an image breaks the row.
    """
    text, images = _templated(processor, special_token_texts(processor), prompt, image)
    return _within_context(_prepared_alone(processor, text, images), context_length)


def prepare_prompts(
    processor,
    rows: Sequence[tuple[str | None, Image.Image | list[Image.Image] | None]],
    context_length: int | None,
) -> list[PreparedPrompt | Exception]:
    """prepare_prompt for each (prompt, image) row, in order: its PreparedPrompt, or the exception that row alone
    raised (a PromptError for a bad row). Rows with the same number of images share one processor call, whose
    outputs are split per row into exactly what the row alone gives (BATCHED_PROCESSORS; other processors, and a
    group whose call fails, are called row by row): the processor's fixed cost per call (its keyword merging and
    validation, the tokenizer's call) was most of a row's preparation. The job's CPU stage on the demo world's rows
    (image bytes decoded, prepared, serialised; one thread): 0.41-0.49 ms a row in blocks of 32, 0.80-0.85 ms with
    a processor call a row."""
    results: list[PreparedPrompt | Exception | None] = [None] * len(rows)
    groups: dict[int, list[tuple[int, str, list[Image.Image]]]] = {}
    specials = special_token_texts(processor)  # the same for every row
    for i, (prompt, image) in enumerate(rows):
        try:
            text, images = _templated(processor, specials, prompt, image)
        except Exception as exc:  # the row's own failure
            results[i] = exc
            continue
        groups.setdefault(len(images), []).append((i, text, images))
    together = any(cls.__name__ in BATCHED_PROCESSORS for cls in type(processor).__mro__)
    for count, members in groups.items():
        prepared = _prepared_together(processor, members, count) if together and len(members) > 1 else None
        for j, (i, text, images) in enumerate(members):
            try:
                results[i] = _within_context(prepared[j] if prepared else _prepared_alone(processor, text, images),
                                             context_length)
            except Exception as exc:  # the row's own failure
                results[i] = exc
    return results


def _templated(processor, specials: set[str], prompt: str | None, image) -> tuple[str, list[Image.Image]]:
    """The row's chat-templated text and its checked RGB images; raises PromptError for a bad row (a prompt holding
    one of `specials`, the processor's special token texts, among them)."""
    if prompt is None or not str(prompt).strip():
        raise PromptError("prompt is empty")
    markup = sorted(t for t in specials if t in str(prompt))
    if markup:
        raise PromptError(f"prompt contains the model's special token text {markup[0]!r}, which would be read as "
                          "markup rather than words; such prompts are refused")
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    images = [_checked_rgb(im) for im in images]
    return processor.apply_chat_template(build_messages(str(prompt), len(images)), add_generation_prompt=True), images


def _prepared_alone(processor, text: str, images: list[Image.Image]) -> PreparedPrompt:
    return _split(processor(text=[text], images=[images] if images else None, return_tensors="pt"), [len(images)])[0]


def _prepared_together(processor, members: list[tuple[int, str, list[Image.Image]]],
                       count: int) -> list[PreparedPrompt] | None:
    """One processor call for rows of `count` images each, split per row; None where it fails (a row that fails
    alone then fails alone) or its outputs do not split."""
    try:
        inputs = processor(text=[text for _, text, _ in members],
                           images=[images for _, _, images in members] if count else None,
                           return_tensors="pt", padding=True)
        return _split(inputs, [count] * len(members))
    except Exception:
        return None


def _split(inputs, images_per_row: list[int]) -> list[PreparedPrompt] | None:
    """A processor's outputs for rows (padded to one length) as each row's PreparedPrompt: its tokens (where the
    attention mask is 1), its per-token inputs likewise, and its share of each vision tensor, whose first dimension
    runs over the images (one entry each) or over the patches of all images (each image's count the product of its
    row of a `*grid_thw` tensor, Qwen-VL's layout); None when a vision tensor fits neither. One row (unpadded) keeps
    the outputs whole."""
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(ids, dtype=torch.bool)
    per_token = [k for k, v in inputs.items() if k not in TEXT_KEYS and v.ndim == 2 and v.shape == ids.shape]
    vision = {k: v for k, v in inputs.items() if k not in TEXT_KEYS and k not in per_token}
    images = sum(images_per_row)
    grids = [v for k, v in vision.items() if k.endswith("grid_thw") and v.ndim == 2 and v.shape[0] == images]
    patches = grids[0].prod(dim=-1).tolist() if grids else None
    shares = {}
    for key, value in vision.items():
        if len(images_per_row) == 1:
            shares[key] = [value]
            continue
        if value.shape[0] == images:
            per_image = [1] * images
        elif patches is not None and value.shape[0] == sum(patches):
            per_image = patches
        else:
            return None
        ends = torch.tensor([0, *per_image]).cumsum(0)[torch.tensor([0, *images_per_row]).cumsum(0)].tolist()
        shares[key] = [value[start:end].clone() for start, end in zip(ends, ends[1:])]  # not views of the batch
    return [PreparedPrompt(input_ids=ids[row][mask[row]].tolist(),
                           vision_inputs={k: shares[k][row] for k in vision},
                           token_inputs={k: inputs[k][row][mask[row]].tolist() for k in per_token})
            for row in range(len(images_per_row))]


def _within_context(prompt: PreparedPrompt, context_length: int | None) -> PreparedPrompt:
    if context_length is not None and len(prompt.input_ids) >= context_length:
        raise PromptError(f"prompt is {len(prompt.input_ids)} tokens, which leaves no room in the target's context of "
                          f"{context_length}")
    return prompt


def special_token_texts(processor) -> set[str]:
    """The texts the tokenizer reads as special tokens (its special and added special tokens, the image token)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = set(tokenizer.all_special_tokens)
    texts.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    image_token = getattr(processor, "image_token", None)
    if image_token:
        texts.add(image_token)
    return {text for text in texts if text}


def _checked_rgb(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise PromptError(f"image is a {type(image).__name__}, not a decoded image")
    if image.width < 1 or image.height < 1:
        raise PromptError(f"image has no pixels ({image.width}x{image.height})")
    try:
        image.load()  # PIL decodes lazily: a truncated or corrupt file fails here
        return to_rgb(image)
    except Exception as exc:
        raise PromptError(f"image cannot be decoded: {exc}") from exc
