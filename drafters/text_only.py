"""Text-only drafter (the MASSV paper's baseline): any HF causal LM with the target's tokenizer.

It reads the prompt with the image placeholder tokens removed, so it never sees the
image, and numbers the remaining tokens from 0 as plain text. A checkpoint is a plain HF causal-LM directory
(safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from drafters.causal_lm import CausalLMDraftModel, load_language_model


class TextOnlyDraftModel(CausalLMDraftModel):
    kind = "text-only"

    def prompt_tokens(self, input_ids: list[int], positions: list[int]) -> tuple[list[int], list[int]]:
        """The text tokens, numbered on their own from 0 as the causal LM was trained to read text."""
        ids = [t for t in input_ids if t != self.image_token_id]
        return ids, list(range(len(ids)))

    @classmethod
    def from_pretrained(cls, path: Path, config: dict, image_token_id: int | None, dtype: torch.dtype,
                        trust_remote_code: bool = False) -> TextOnlyDraftModel:
        return cls(load_language_model(path, dtype, trust_remote_code), image_token_id)

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        self.language_model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
