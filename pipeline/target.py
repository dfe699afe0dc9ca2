"""The target VLM: loading through HF Auto classes, prefill with image features computed once, verify, rollback.

Any image-text-to-text checkpoint directory works (LLaVA and Gemma3 are tested).
The image features the target computes for its own prefill are returned so a
drafter that wants them (MASSV) reuses them instead of running the vision tower again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipeline.decoder import RaggedDecoder, embed_with_image_features, left_pad


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when a GPU is present, else CPU with float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


@dataclass
class PreparedPrompt:
    """One row, tokenised and with its image processed, ready for the engine."""

    input_ids: list[int]
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. pixel_values [1, 3, H, W]
    token_inputs: dict[str, list[int]] = field(default_factory=dict)  # per-token extras, e.g. token_type_ids


@dataclass
class TargetPrefill:
    first_logits: torch.Tensor  # [B, V] logits after each row's prompt
    image_features: torch.Tensor | None  # [image tokens of the batch, hidden], row-major


MULTI_AXIS_ROPE = (
    "uses multi-axis rotary positions (Qwen2-VL style), which the engine does not support yet: "
    "use a target with 1D positions such as LLaVA or Gemma3."
)


class Target:
    """Owns the target model and its ragged cache; `verify` runs one forward for the whole batch."""

    def __init__(self, model, processor, name: str = "target"):
        if any(hasattr(m, "get_rope_index") for m in (model, getattr(model, "model", None))):
            raise ValueError(f"{type(model).__name__} {MULTI_AXIS_ROPE}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.name = name
        config = model.config
        self.text_config = config.get_text_config()
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(config, "image_token_index", None)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.context_length = getattr(self.text_config, "max_position_embeddings", None)
        self.eos_token_ids = _eos_ids(model, self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.decoder = RaggedDecoder(model)

    @classmethod
    def load(cls, path: str, device=None, dtype=None, trust_remote_code: bool = False) -> Target:
        default_device, default_dtype = pick_device()
        device, dtype = device or default_device, dtype or default_dtype
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=True,
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        ).to(device)
        return cls(model, processor, name=str(path))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def lengths(self) -> torch.Tensor:
        return self.decoder.lengths

    @torch.no_grad()
    def image_features(self, vision_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Features that fill the image placeholder tokens: [image tokens, hidden]."""
        if not vision_inputs:
            return None
        inputs = {k: v.to(self.device) for k, v in vision_inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.get_image_features(**inputs)
        features = getattr(out, "pooler_output", out)
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        return features.reshape(-1, features.shape[-1])

    @torch.no_grad()
    def prefill(self, prompts: list[PreparedPrompt], append: bool = False) -> TargetPrefill:
        """Prefill these rows, as the whole batch or (append) after the rows already decoding."""
        ids, mask = left_pad([p.input_ids for p in prompts], self.pad_token_id, self.device)
        vision = _concat_vision_inputs(prompts)
        features = self.image_features(vision)
        embeds = embed_with_image_features(self.model.get_input_embeddings(), ids, self.image_token_id, features)
        token_inputs = {
            name: left_pad([p.token_inputs[name] for p in prompts], 0, self.device)[0]
            for name in prompts[0].token_inputs
        }
        logits = self.decoder.prefill(embeds, mask, append=append, **token_inputs)
        return TargetPrefill(first_logits=logits, image_features=features)

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, q, V] for tokens [B, q] = [last token, drafts...] of every row, one forward."""
        return self.decoder.forward(tokens)

    def keep(self, kept: torch.Tensor) -> None:
        """Roll back: keep the first kept[i] tokens of the last verify for row i."""
        self.decoder.advance(kept)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.decoder.select_rows(rows)


def _concat_vision_inputs(prompts: list[PreparedPrompt]) -> dict[str, torch.Tensor]:
    with_images = [p.vision_inputs for p in prompts if p.vision_inputs]
    if not with_images:
        return {}
    return {name: torch.cat([v[name] for v in with_images]) for name in with_images[0]}


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config.get_text_config()):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
            break
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
