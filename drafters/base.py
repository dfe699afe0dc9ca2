"""The interface the engine calls on a drafter.

A drafter proposes k draft tokens per row (and, when sampling, the distributions
it drew them from); the engine verifies them with the target and tells the
drafter what was kept. The drafter owns its own cache and rolls it back itself.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pipeline.acceptance import SamplingConfig
from pipeline.target import PreparedPrompt


class Drafter(Protocol):
    name: str

    def prefill(
        self,
        prompts: list[PreparedPrompt],
        image_features: torch.Tensor | None,  # [image tokens of the batch, target hidden], from the target
        first_tokens: torch.Tensor,  # [B] the target's first generated token per row
        append: bool = False,  # these rows join the rows already drafting (continuous batching)
    ) -> None: ...

    def propose(
        self, k: int, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k >= 1 draft tokens [B, k] and, when sampling, their distributions [B, k, target vocab]."""
        ...

    def commit(
        self,
        num_accepted: torch.Tensor,  # [B] drafts the target accepted
        output_tokens: torch.Tensor,  # [B, k+1] emitted tokens, placeholder after num_accepted
    ) -> None: ...

    def select_rows(self, rows: torch.Tensor) -> None: ...
