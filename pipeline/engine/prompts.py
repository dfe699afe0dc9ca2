"""The engine's input: one (prompt, image) row as a PreparedPrompt (chat template applied, tokenised, image processed).

`prepare_prompt` is what a user of the engine calls per row, and what the job's CPU
stage calls for every row of a dataset (`pipeline/job/preprocess.py`). A row that
cannot be prepared raises PromptError with a message meant for the row's `error`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

TEXT_KEYS = ("input_ids", "attention_mask")


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
    if prompt is None or not str(prompt).strip():
        raise PromptError("prompt is empty")
    markup = sorted(t for t in special_token_texts(processor) if t in str(prompt))
    if markup:
        raise PromptError(f"prompt contains the model's special token text {markup[0]!r}, which would be read as "
                          "markup rather than words; such prompts are refused")
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    images = [_checked_rgb(im) for im in images]
    text = processor.apply_chat_template(build_messages(str(prompt), len(images)), add_generation_prompt=True)
    inputs = processor(text=[text], images=[images] if images else None, return_tensors="pt")
    input_ids = inputs["input_ids"][0].tolist()
    if context_length is not None and len(input_ids) >= context_length:
        raise PromptError(
            f"prompt is {len(input_ids)} tokens, which leaves no room in the target's context of {context_length}"
        )
    per_token = [k for k, v in inputs.items() if k not in TEXT_KEYS and v.ndim == 2 and v.shape[1] == len(input_ids)]
    token_inputs = {k: inputs[k][0].tolist() for k in per_token}
    vision_inputs = {k: v for k, v in inputs.items() if k not in TEXT_KEYS and k not in token_inputs}
    return PreparedPrompt(input_ids=input_ids, vision_inputs=vision_inputs, token_inputs=token_inputs)


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
