"""The family seam: everything that differs between target families, in one place.

A family says
  - how prefill positions are computed on the left-padded batch, and how each row's decode
    positions continue from its cache slots (a per-row offset: slot != position is allowed);
  - which extra per-token inputs the model takes in prefill (Gemma3: token_type_ids);
  - how the image features that fill the placeholder positions are obtained;
  - whether the engine can run it at all, and the context length.
The engine, the target and the ragged decoder call these and name no family.

LLaVA and Gemma3 use one-axis rotary positions: position = cache slot, offset 0.
Multi-axis rotary families (Qwen2-VL and later: positions [3, B, q] from an image-grid
aware rope index, rows continuing from a per-row offset) are refused until their
family lands here.
"""

from __future__ import annotations

import sys

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from pipeline.engine.padding import left_pad

MULTI_AXIS_ROPE = (
    "uses multi-axis rotary positions (Qwen2-VL style), which the engine does not support yet: "
    "use a target with 1D positions such as LLaVA or Gemma3."
)


class RotaryFamily:
    """One-axis rotary positions: a token's position is its cache slot."""

    def prefill_inputs(self, token_inputs: list[dict[str, list[int]]], device) -> dict[str, torch.Tensor]:
        """Per-token extras of the rows (e.g. token_type_ids), left-padded with 0 like the ids: {name: [B, L]}."""
        return {name: left_pad([row[name] for row in token_inputs], 0, device)[0] for name in token_inputs[0]}

    def prefill_positions(
        self,
        model,
        attention_mask: torch.Tensor,  # [B, L] 0/1, zeros on the left
        model_inputs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # position_ids [B, L], offsets [B] (position - slot, per row)
        positions = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
        return positions, torch.zeros(attention_mask.shape[0], dtype=torch.long)

    def decode_positions(
        self,
        slots: torch.Tensor,  # [B, q] cache slots of the tokens in flight
        offsets: torch.Tensor,  # [B] per-row position offset, on the host
    ) -> torch.Tensor:  # [B, q] position ids
        return slots

    @torch.no_grad()
    def image_features(self, model, vision_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The vectors that fill the image placeholder tokens, [image tokens, hidden] in row-major order."""
        if not vision_inputs:
            return None
        inputs = {k: v.to(model.device) for k, v in vision_inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.get_image_features(**inputs)
        features = getattr(out, "pooler_output", out)
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        return features.reshape(-1, features.shape[-1])


ROTARY = RotaryFamily()
FAMILIES = {"llava": ROTARY, "gemma3": ROTARY}  # model_type -> family; other 1-D rotary VLMs use ROTARY too


def family_for(config) -> RotaryFamily:
    """The family of a model config; raises ValueError for one the engine cannot run."""
    if config.model_type in FAMILIES:
        return FAMILIES[config.model_type]
    if uses_multi_axis_rope(config):
        raise ValueError(f"{config.model_type} {MULTI_AXIS_ROPE}")
    return ROTARY


def uses_multi_axis_rope(config) -> bool:
    """True for Qwen2-VL-style models: their modeling module computes a rope index from the image grid."""
    class_name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)
    model_class = getattr(transformers, class_name, None) if class_name else None
    module = sys.modules.get(model_class.__module__) if model_class else None
    return bool(module) and any(
        hasattr(obj, "get_rope_index") for obj in vars(module).values() if isinstance(obj, type)
    )


def context_length(text_config) -> int | None:
    """Tokens a row may hold, prompt and answer together."""
    return getattr(text_config, "max_position_embeddings", None)
