"""Loading a target's processor: AutoProcessor, or a torchvision-free equivalent for the Qwen-VL families.

transformers builds Qwen2.5-VL's and Qwen3-VL's processors only with torchvision installed
(their video processor needs it, even for images alone). Where AutoProcessor fails on such a
checkpoint because torchvision cannot be imported, `QwenVLImageProcessor` does what those
processors do for text and images, from the checkpoint's own tokenizer, chat template and
PIL image processor (`Qwen2VLImageProcessorPil`): each image placeholder expands to one
token per merged patch group of its grid, and `mm_token_type_ids` marks the image tokens.
tests/engine/test_qwen_families.py checks it against the processors' own `__call__`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer, BatchFeature

log = logging.getLogger(__name__)

TORCHVISION_BOUND = {"qwen2_5_vl", "qwen3_vl"}  # model types whose processor transformers builds only with torchvision
IMAGE_TOKEN = "<|image_pad|>"


def load_processor(path: str, trust_remote_code: bool = False):
    """The checkpoint's processor as AutoProcessor builds it, or the Qwen-VL equivalent where torchvision is missing."""
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if torchvision_imports() or _model_type(path) not in TORCHVISION_BOUND:
            raise
        log.warning("%s: transformers cannot build this processor without torchvision (%s: %s); using an "
                    "equivalent built from the checkpoint's tokenizer, chat template and PIL image processor",
                    path, type(exc).__name__, next((line for line in str(exc).splitlines() if line.strip()), ""))
        return QwenVLImageProcessor.from_pretrained(path)


class QwenVLImageProcessor:
    """Qwen2.5-VL / Qwen3-VL processing of text and images, without torchvision (videos are not supported)."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, path: str) -> QwenVLImageProcessor:
        from transformers import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(path)
        template_file = Path(path) / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else tokenizer.chat_template
        return cls(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(path), template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, text: list[str], images: list[list] | None = None, return_tensors: str = "pt",
                 padding: bool = False) -> BatchFeature:
        """input_ids, attention_mask and mm_token_type_ids [B, L]; pixel_values [patches, C*T*P*P] and
        image_grid_thw [images, 3] when there are images (in the order their placeholders appear)."""
        vision = {}
        if images:
            flat = [image for row in images for image in row]
            vision = dict(self.image_processor(images=flat, return_tensors="pt"))
            tokens_per_image = iter((vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist())
            text = [self._expand_placeholders(t, tokens_per_image) for t in text]
            if next(tokens_per_image, None) is not None:
                raise ValueError("more images than image placeholders in the text")
        encoded = self.tokenizer(text, return_tensors="pt", padding=padding)
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).long()
        return BatchFeature({**encoded, **vision}, tensor_type=return_tensors)

    def _expand_placeholders(self, text: str, tokens_per_image) -> str:
        pieces = text.split(self.image_token)
        out = [pieces[0]]
        for piece in pieces[1:]:
            count = next(tokens_per_image, None)
            if count is None:
                raise ValueError("more image placeholders in the text than images")
            out += [self.image_token * count, piece]
        return "".join(out)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build that does not match this torch
        return False
    return True


def _model_type(path: str) -> str | None:
    config = Path(path) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.exists() else None
