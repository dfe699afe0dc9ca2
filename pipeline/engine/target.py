"""The target VLM: loading through HF Auto classes, prefill with image features computed once, verify, rollback.

Any image-text-to-text checkpoint directory of a supported family works (LLaVA, Gemma3,
Qwen2.5-VL and Qwen3-VL are tested; families.py says what differs between families). The image
features the target computes for its own prefill are returned so a drafter that
wants them (MASSV, MSD) reuses them instead of running the vision tower again; its
last hidden states, from prefill and from each verify, are returned to a drafter that
reads them (MSD), from the same forwards, and not kept otherwise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import AutoModelForImageTextToText

from pipeline.engine.decoder import RaggedDecoder
from pipeline.engine.families import RotaryFamily, context_length, family_for
from pipeline.engine.padding import left_pad
from pipeline.engine.processors import load_processor
from pipeline.engine.prompts import PreparedPrompt


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when a GPU is present, else CPU with float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


@dataclass
class TargetPrefill:
    first_logits: torch.Tensor  # [B, V] logits after each row's prompt
    image_features: torch.Tensor | None  # [image tokens of the batch, hidden], row-major
    positions: list[list[int]]  # per row, each prompt token's position on the target's text axis
    hidden_states: torch.Tensor | None = None  # [B, L, H] last hidden states, left-padded like the prompts (on request)


class Target:
    """Owns the target model and its ragged cache; `verify` runs one forward for the whole batch."""

    def __init__(self, model, processor, name: str = "target", family: RotaryFamily | None = None):
        config = model.config
        self.family = family or family_for(config)  # raises for a family the engine cannot run
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.name = name
        self.text_config = config.get_text_config()
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(config, "image_token_index", None)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.context_length = context_length(self.text_config)
        self.eos_token_ids = _eos_ids(model, self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.decoder = RaggedDecoder(model, self.family)

    @classmethod
    def load(cls, path: str, device=None, dtype=None, trust_remote_code: bool = False) -> Target:
        default_device, default_dtype = pick_device()
        device, dtype = device or default_device, dtype or default_dtype
        processor = load_processor(path, trust_remote_code=trust_remote_code)
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
        return self.decoder.device

    @property
    def lengths(self) -> torch.Tensor:
        return self.decoder.lengths

    def image_features(self, vision_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Features that fill the image placeholder tokens: [image tokens, hidden]."""
        return self.family.image_features(self.model, vision_inputs)

    @torch.no_grad()
    def prefill(self, prompts: list[PreparedPrompt], append: bool = False, hidden_states: bool = False
                ) -> TargetPrefill:
        """Prefill these rows, as the whole batch or (append) after the rows already decoding; with hidden_states,
        also the last hidden state of every prompt token (for a drafter that reads them)."""
        ids, mask, token_inputs, vision_inputs = self._padded(prompts)
        masks = self.family.prefill_masks(self.model, mask, token_inputs)
        inputs = self.family.prefill_inputs(self.model, ids, self.image_token_id, vision_inputs, token_inputs,
                                            through_stack=self.decoder.prefills_through_stack(masks is not None))
        positions, offsets = self.family.prefill_positions(self.model, ids, mask, token_inputs, vision_inputs)
        out = self.decoder.prefill(mask, positions, offsets, append=append, hidden_states=hidden_states,
                                   model_masks=masks, **inputs.model_inputs)
        return TargetPrefill(out.logits[:, -1], inputs.image_features,
                             _unpadded(self.family.text_axis(positions), mask),
                             out.hidden_states[-1] if hidden_states else None)

    def prompt_positions(self, prompts: list[PreparedPrompt]) -> list[list[int]]:
        """Per row, each prompt token's position on the text axis, as prefill numbers it (no forward)."""
        ids, mask, token_inputs, vision_inputs = self._padded(prompts)
        positions, _ = self.family.prefill_positions(self.model, ids, mask, token_inputs, vision_inputs)
        return _unpadded(self.family.text_axis(positions), mask)

    def _padded(self, prompts: list[PreparedPrompt]):
        """Left-padded ids [B, L], mask [B, L] and per-token extras {name: [B, L]}; the rows' images, concatenated."""
        ids, mask = left_pad([p.input_ids for p in prompts], self.pad_token_id, self.device)
        token_inputs = {name: left_pad([p.token_inputs[name] for p in prompts], 0, self.device)[0]
                        for name in prompts[0].token_inputs}
        return ids, mask, token_inputs, _concat_vision_inputs(prompts)

    def verify(self, tokens: torch.Tensor, hidden_states: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, q, V] for tokens [B, q] = [last token, drafts...] of every row, one forward, and (on request)
        the last hidden states [B, q, H]; all q are appended until `rollback` discards the rejected ones."""
        out = self.decoder.forward(input_ids=tokens, hidden_states=hidden_states)
        return out.logits, out.hidden_states[-1] if hidden_states else None

    def rollback(self, num_rejected: torch.Tensor) -> None:
        """Discard the last num_rejected[i] verified tokens of row i (host tensor)."""
        self.decoder.rollback(num_rejected)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.decoder.select_rows(rows)

    def fork(self) -> Target:
        """The same model with rows of its own (none yet): rows prefilled ahead of their admission wait in one."""
        forked = copy.copy(self)
        forked.decoder = self.decoder.fork()
        return forked

    def adopt_rows(self, other: Target, count: int, append: bool) -> None:
        """Move the last `count` rows of a fork after these rows (or, not append, in place of them)."""
        self.decoder.adopt_rows(other.decoder, count, append)


def _concat_vision_inputs(prompts: list[PreparedPrompt]) -> dict[str, torch.Tensor]:
    with_images = [p.vision_inputs for p in prompts if p.vision_inputs]
    if not with_images:
        return {}
    return {name: torch.cat([v[name] for v in with_images]) for name in with_images[0]}


def _unpadded(positions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Rows of a left-padded [B, L] tensor without their padding (one host copy, not two tensor calls a row)."""
    width = mask.shape[1]
    return [row[width - length:] for row, length in zip(positions.tolist(), mask.sum(dim=1).tolist())]


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
