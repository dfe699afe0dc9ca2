"""The family seam: everything that differs between target families, in one place.

A family says
  - what the model's prefill forward takes: the prompt embeddings with the image features filled
    in (Qwen3-VL: and its DeepStack features, which the exact stack adds inside early layers; for
    HF's own forward, the ids plus the encoder outputs, so it does what it does with them);
  - how prefill positions are computed on the left-padded batch, and how each row's decode
    positions continue from its cache slots (a per-row offset: slot != position is allowed);
  - which extra per-token inputs the model takes in prefill (Qwen: mm_token_type_ids), and the
    prefill's attention masks where the family builds them (Gemma3's, from its token_type_ids);
  - how the image features that fill the placeholder positions are obtained (for the drafter too);
  - whether the engine can run it at all, and the context length.
The engine, the target and the ragged decoder call these and name no family.

LLaVA and Gemma3 use one-axis rotary positions: position = cache slot, offset 0. A 1-D drafter
that reads the target's own tokens (MASSV) takes each token's position on the target's text
axis (`text_axis`), so its text sits where the target's does.
Qwen2.5-VL and Qwen3-VL use multi-axis rotary positions (M-RoPE): [3, B, q] from the model's own
image-grid aware rope index, so a row's text after an image sits at positions below its slot
count; every later token continues at slot + the row's offset on all three axes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from pipeline.engine.fused import DeepStack
from pipeline.engine.kv_cache import FULL_ATTENTION, SLIDING_ATTENTION


@dataclass
class PrefillInputs:
    model_inputs: dict  # keyword arguments of the model's prefill forward, besides mask, positions and cache
    image_features: torch.Tensor | None  # [image tokens of the batch, hidden], row-major: what a drafter reuses


def embed_with_image_features(
    embedding: nn.Module,
    input_ids: torch.Tensor,  # [B, L]
    image_token_id: int | None,
    image_features: torch.Tensor | None,  # [num image tokens in input_ids, hidden], row-major order
) -> torch.Tensor:  # [B, L, hidden]
    """Token embeddings with the image placeholder positions filled by image features."""
    if image_features is None or image_token_id is None:
        return embedding(input_ids)
    is_image = input_ids == image_token_id
    embeds = embedding(input_ids.masked_fill(is_image, 0))  # the placeholder id may be outside the vocabulary
    if int(is_image.sum()) != image_features.shape[0]:
        raise ValueError(
            f"{int(is_image.sum())} image placeholder tokens but {image_features.shape[0]} image feature vectors"
        )
    return embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))


class RotaryFamily:
    """One-axis rotary positions: a token's position is its cache slot plus its row's offset (0 from prefill)."""

    def prefill_inputs(
        self,
        model,
        input_ids: torch.Tensor,  # [B, L] left-padded
        image_token_id: int | None,
        vision_inputs: dict[str, torch.Tensor],  # the batch's images, concatenated (empty without images)
        token_inputs: dict[str, torch.Tensor],  # per-token extras, left-padded with 0 like the ids: {name: [B, L]}
        through_stack: bool = False,  # the target's exact stack runs the prefill (decoder.py), not its HF forward
    ) -> PrefillInputs:
        """The prefill forward's inputs: embeddings with the image features in place, plus per-token extras."""
        features = self.image_features(model, vision_inputs)
        embeds = embed_with_image_features(model.get_input_embeddings(), input_ids, image_token_id, features)
        return PrefillInputs({"inputs_embeds": embeds, **token_inputs}, features)

    def prefill_positions(
        self,
        model,
        input_ids: torch.Tensor,  # [B, L] left-padded
        attention_mask: torch.Tensor,  # [B, L] 0/1, zeros on the left
        token_inputs: dict[str, torch.Tensor],  # {name: [B, L]}
        vision_inputs: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:  # position_ids [B, L] (or [axes, B, L]), offsets [B] on the host
        """Each prompt token's position, and each row's offset: the position of its next token minus its length."""
        positions = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
        return positions, torch.zeros(attention_mask.shape[0], dtype=torch.long)

    def prefill_masks(
        self,
        model,
        attention_mask: torch.Tensor,  # [B, L] 0/1, zeros on the left
        token_inputs: dict[str, torch.Tensor],  # {name: [B, L]}
    ) -> dict[str, torch.Tensor] | None:  # per layer type, [B, 1, L, L] bool; None: the forward builds its own
        """The prefill forward's attention masks, where the family builds them (HF's forward takes masks given as a
        dict by layer type as they are)."""
        return None

    def text_axis(self, positions: torch.Tensor) -> torch.Tensor:  # [B, L] from prefill_positions' positions
        """One position per token, the one text tokens share on every axis: what a 1-D drafter reads."""
        return positions

    def decode_positions(
        self,
        slots: torch.Tensor,  # [B, q] cache slots of the tokens in flight
        offsets: torch.Tensor,  # [B] per-row position offset, on the host
    ) -> torch.Tensor:  # [B, q] position ids
        return slots + offsets.to(slots.device)[:, None]

    @torch.no_grad()
    def image_features(self, model, vision_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The vectors that fill the image placeholder tokens, [image tokens, hidden] in row-major order."""
        if not vision_inputs:
            return None
        return _flat_features(model.get_image_features(**_on_model(model, vision_inputs)))


class BidirectionalImageFamily(RotaryFamily):
    """Gemma3: one-axis rotary positions, and in prefill each image's tokens attend to each other both ways (by
    `token_type_ids`), on its full-attention layers and, within the window, its sliding ones.

    HF's forward builds those masks element by element from mask functions under vmap: 70% of a 51-token prompt's
    prefill on the tiny test target (17 of 24 ms). The same boolean masks, built here with tensor ops from the same
    rule (HF's create_masks_for_vision_model: full (causal or same image) and not padding; sliding the same within
    the window, both over the left-padded batch's columns), go to the target's exact stack (decoder.py), or to HF's
    forward, which takes them as they are.
    """

    def prefill_inputs(self, model, input_ids, image_token_id, vision_inputs, token_inputs,
                       through_stack: bool = False) -> PrefillInputs:
        """As every 1-D family's, without the token types: they only shape the masks, which prefill_masks builds."""
        extras = {name: value for name, value in token_inputs.items() if name != "token_type_ids"}
        return super().prefill_inputs(model, input_ids, image_token_id, vision_inputs, extras, through_stack)

    def prefill_masks(self, model, attention_mask, token_inputs):
        text_config = model.config.get_text_config()
        token_types = token_inputs.get("token_type_ids")
        # boolean masks are what HF's sdpa path takes (its eager path adds float ones); a bidirectional text model
        # overlays more than images
        if (token_types is None or text_config._attn_implementation != "sdpa"
                or getattr(text_config, "use_bidirectional_attention", False)):
            return None
        is_image = token_types == 1
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]  # an image's first token
        blocks = torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)  # [B, L]: image number, -1 for text
        columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        causal = columns[None, :] <= columns[:, None]  # [q, kv]
        same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)  # [B, q, kv]
        allowed = (causal | same_image) & attention_mask.bool()[:, None, :]
        window = text_config.sliding_window
        in_window = columns[None, :] > columns[:, None] - window
        return {FULL_ATTENTION: allowed[:, None], SLIDING_ATTENTION: (allowed & in_window)[:, None]}


class MultiAxisRopeFamily(RotaryFamily):
    """Qwen2.5-VL, Qwen3-VL: M-RoPE positions [3, B, q] from the model's rope index, continued per row.

    The vision tower runs once, and its merged features go on to the drafter. Prefill hands the model the
    prompt's embeddings with the features filled in, as HF's forward fills them, so its language model alone
    runs them and a target's exact stack can (decoder.py); with DeepStack (Qwen3-VL) the features its vision
    tower took from several layers go with them, added after the language model's first layers (fused.py). A
    Qwen3-VL target whose prefill goes through HF's forward gets the ids and the encoder's outputs
    (`mm_encoder_outputs`) instead, HF's forward doing both. The per-token type ids only shape the rope
    index, which prefill_positions computes, so they stay out.
    """

    def __init__(self, deepstack: bool):
        self.deepstack = deepstack

    def prefill_inputs(self, model, input_ids, image_token_id, vision_inputs, token_inputs,
                       through_stack: bool = False) -> PrefillInputs:
        encoded = None
        if vision_inputs:
            with torch.no_grad():
                encoded = model.get_image_features(**_on_model(model, vision_inputs), return_dict=True)
        features = _flat_features(encoded) if encoded is not None else None
        if self.deepstack and not through_stack:
            model_inputs = {"input_ids": input_ids, **token_inputs}
            if encoded is not None:
                model_inputs["mm_encoder_outputs"] = {"image": encoded}
            return PrefillInputs(model_inputs, features)
        embeds = embed_with_image_features(model.get_input_embeddings(), input_ids, image_token_id, features)
        model_inputs = {"inputs_embeds": embeds}
        if self.deepstack and encoded is not None:  # per early layer, every image's tokens of the batch, row-major
            model_inputs["deepstack"] = DeepStack(input_ids == image_token_id,
                                                  [torch.cat(per_image).to(embeds.dtype)
                                                   for per_image in encoded.deepstack_features])
        return PrefillInputs(model_inputs, features)

    def prefill_positions(self, model, input_ids, attention_mask, token_inputs, vision_inputs):
        # [3, B, L]; per-row delta = (largest position + 1) - row length, so slot + delta continues the row
        token_types = token_inputs.get("mm_token_type_ids")  # text 0, image 1: what the rope index groups by
        if token_types is None:
            token_types = (input_ids == model.config.image_token_id).long()
        positions, deltas = model.model.get_rope_index(
            input_ids, token_types, vision_inputs.get("image_grid_thw"), attention_mask=attention_mask
        )
        return positions, deltas.reshape(-1).cpu()

    def text_axis(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[0]  # temporal: a text token's position on all three axes; an image's start

    def decode_positions(self, slots, offsets) -> torch.Tensor:  # [3, B, q]: every axis continues alike
        return super().decode_positions(slots, offsets)[None].expand(3, -1, -1)


ROTARY = RotaryFamily()
# model_type -> family; other 1-D rotary VLMs use ROTARY too
FAMILIES = {"llava": ROTARY, "gemma3": BidirectionalImageFamily(), "qwen2_5_vl": MultiAxisRopeFamily(deepstack=False),
            "qwen3_vl": MultiAxisRopeFamily(deepstack=True)}
UNTESTED_MULTI_AXIS_ROPE = (
    "uses multi-axis rotary positions (M-RoPE) in a way the engine has not been tested with: "
    "supported multi-axis families are Qwen2.5-VL and Qwen3-VL."
)


def family_for(config) -> RotaryFamily:
    """The family of a model config; raises ValueError for one the engine cannot run."""
    if config.model_type in FAMILIES:
        return FAMILIES[config.model_type]
    if uses_multi_axis_rope(config):
        raise ValueError(f"{config.model_type} {UNTESTED_MULTI_AXIS_ROPE}")
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


def _on_model(model, vision_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inputs = {k: v.to(model.device) for k, v in vision_inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _flat_features(encoder_output) -> torch.Tensor:
    """[image tokens, hidden] from what get_image_features returns (a tensor, or per-image pooled outputs)."""
    features = getattr(encoder_output, "pooler_output", encoder_output)
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])
