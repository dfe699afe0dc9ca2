"""Turn one (prompt, image) row into a PreparedPrompt: normalise the image, apply the chat template, tokenise.

Runs on CPU workers. A row that cannot be prepared raises PromptError with a
message meant for the row's `error` column; other rows are unaffected.
`prepare_batch` is the job's CPU stage: source rows in (see sources.py),
rows with the prepared prompt serialised as safetensors bytes out.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pipeline.sources import image_from_row
from pipeline.target import PreparedPrompt

TEXT_KEYS = ("input_ids", "attention_mask")
PREPARED_SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), ("prepared", pa.binary()), ("image", pa.binary()),
     ("error", pa.string())]
)


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
    """Chat-templated, tokenised prompt with its image(s) processed; raises PromptError for a bad row."""
    if prompt is None or not str(prompt).strip():
        raise PromptError("prompt is empty")
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


def encode_prepared(prompt: PreparedPrompt) -> bytes:
    """A PreparedPrompt as safetensors bytes (no pickles cross the object store)."""
    tensors = {"input_ids": torch.tensor(prompt.input_ids, dtype=torch.long)}
    tensors.update({f"vision.{k}": v.contiguous() for k, v in prompt.vision_inputs.items()})
    tensors.update({f"token.{k}": torch.tensor(v, dtype=torch.long) for k, v in prompt.token_inputs.items()})
    return save_tensors(tensors)


def decode_prepared(data: bytes) -> PreparedPrompt:
    tensors = load_tensors(data)
    return PreparedPrompt(
        input_ids=tensors.pop("input_ids").tolist(),
        vision_inputs={k.removeprefix("vision."): v for k, v in tensors.items() if k.startswith("vision.")},
        token_inputs={k.removeprefix("token."): v.tolist() for k, v in tensors.items() if k.startswith("token.")},
    )


def prepare_batch(batch: pa.Table, processor, context_length: int | None, keep_images: bool = False) -> pa.Table:
    """The CPU stage: fetch and decode each row's image, template and tokenise; failures become `error`.

    keep_images carries each row's image bytes on to the output (a self-distillation corpus needs them).
    """
    out = []
    for row in batch.to_pylist():
        prepared, data, error = None, None, row["error"]
        if error is None:
            try:
                data = _fetch_image(row)
                prepared = encode_prepared(prepare_prompt(processor, row["prompt"], _decode(data), context_length))
            except PromptError as exc:
                error = str(exc)
        out.append({"id": row["id"], "prompt": row["prompt"], "prepared": prepared,
                    "image": data if keep_images else None, "error": error})
    return pa.Table.from_pylist(out, schema=PREPARED_SCHEMA)


def _fetch_image(row: dict) -> bytes | None:
    try:
        return image_from_row(row)
    except FileNotFoundError:
        raise PromptError(f"image file not found: {row['image_url']}") from None
    except Exception as exc:
        raise PromptError(f"image cannot be read from {row['image_url']}: {exc}") from None


def _decode(data: bytes | None) -> Image.Image | None:
    if data is None:
        return None
    if not data:
        raise PromptError("image is empty")
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PromptError(f"image cannot be decoded: {exc}") from None
