"""The job's CPU stage: fetch and decode each row's image, then the engine's `prepare_prompts`, serialised.

Runs in Ray Data CPU tasks. `prepare_batch` takes source rows (see sources.py) and
returns rows with the PreparedPrompt as safetensors bytes (no pickles cross the
object store); a row that cannot be prepared gets its `error` and the others are
unaffected. `decode_prepared` turns the bytes back into a PreparedPrompt in the actor.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pipeline.engine.prompts import PreparedPrompt, PromptError, prepare_prompt, prepare_prompts
from pipeline.job.output import row_error
from pipeline.job.sources import image_from_row

# The probe row of prepared_row_bytes: a mid-sized image (processors that resize to a fixed size give its exact bytes,
# those that keep an image's size, as Qwen-VL's do, about a middling one's).
PROBE_IMAGE_SIDE = 448
PROBE_PROMPT = "Describe the image."

# Image fetches in flight per prepare call. A read from object storage waits tens of milliseconds on the network,
# and the rows of one input file are prepared by one task: fetched one after another, they would cap a file's rows
# at a few dozen a second, whatever the engine could take.
FETCH_THREADS = 16

PREPARED_SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), ("prepared", pa.binary()), ("image", pa.binary()),
     ("error", pa.string())]
)


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


def prepared_row_bytes(processor, context_length: int | None) -> int | None:
    """About how many bytes one prepared row takes (a probe row with a PROBE_IMAGE_SIDE-pixel square image); None when
    the probe cannot be prepared (a context too short for it, say): only a size is at stake, never the job."""
    image = Image.new("RGB", (PROBE_IMAGE_SIDE, PROBE_IMAGE_SIDE), (127, 127, 127))
    try:
        return len(encode_prepared(prepare_prompt(processor, PROBE_PROMPT, image, context_length)))
    except Exception:
        return None


def prepare_batch(batch: pa.Table, processor, context_length: int | None, keep_images: bool = False,
                  max_image_pixels: int | None = None) -> pa.Table:
    """The CPU stage: fetch and decode each row's image, template and tokenise; failures become `error`.

    Whatever goes wrong with one row, whatever the exception class, becomes that row's error: the
    others are prepared as if it were not there. keep_images carries each row's image bytes on to the
    output (a self-distillation corpus needs them); images over max_image_pixels are refused before
    they are decoded.
    """
    rows = batch.to_pylist()
    errors = [row["error"] for row in rows]
    images: list[bytes | None] = [None] * len(rows)
    to_prepare = []  # (row index, prompt, decoded image)
    for i, (row, fetched) in enumerate(zip(rows, _fetch_images(rows))):
        if errors[i] is None:
            try:
                if isinstance(fetched, Exception):
                    raise fetched
                images[i] = fetched
                to_prepare.append((i, row["prompt"], _decode(fetched, max_image_pixels)))
            except Exception as exc:  # whatever it is: this row's error, never the job's
                errors[i] = _error_text(exc)
    prepared: list[bytes | None] = [None] * len(rows)
    results = prepare_prompts(processor, [(prompt, image) for _, prompt, image in to_prepare], context_length)
    for (i, _, _), result in zip(to_prepare, results):
        try:
            if isinstance(result, Exception):
                raise result
            prepared[i] = encode_prepared(result)
        except Exception as exc:
            errors[i] = _error_text(exc)
    return pa.Table.from_pylist(
        [{"id": row["id"], "prompt": row["prompt"], "prepared": prepared[i],
          "image": images[i] if keep_images else None, "error": errors[i]} for i, row in enumerate(rows)],
        schema=PREPARED_SCHEMA)


def _error_text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, PromptError) else row_error(exc)


def _fetch_images(rows: list[dict]) -> list:
    """Each row's image bytes (None without an image), or the exception its fetch raised; the fetches from
    image_url run concurrently."""
    remote = [i for i, row in enumerate(rows) if row["error"] is None and row["image"] is None and row["image_url"]]
    fetched = [row["image"] for row in rows]
    if remote:
        with ThreadPoolExecutor(min(FETCH_THREADS, len(remote))) as pool:
            for i, result in zip(remote, pool.map(_fetch_or_error, [rows[i] for i in remote])):
                fetched[i] = result
    return fetched


def _fetch_or_error(row: dict):
    try:
        return _fetch_image(row)
    except Exception as exc:  # the row's own failure, raised again where its error is recorded
        return exc


def _fetch_image(row: dict) -> bytes | None:
    try:
        return image_from_row(row)
    except FileNotFoundError:
        raise PromptError(f"image file not found: {row['image_url']}") from None
    except Exception as exc:
        raise PromptError(f"image cannot be read from {row['image_url']}: {exc}") from None


def _decode(data: bytes | None, max_pixels: int | None) -> Image.Image | None:
    """Open the image (its header only); refuse one over the pixel budget before decoding a single pixel."""
    if data is None:
        return None
    if not data:
        raise PromptError("image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PromptError(f"image cannot be decoded: {exc}") from None
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise PromptError(f"image is {image.width}x{image.height} pixels, over the budget of {max_pixels:,} "
                          "(--max-image-pixels); it was not decoded")
    return image
