"""The interface the engine calls on a drafter (the kinds live in drafters/, one module each).

A drafter proposes k draft tokens per row (and, when sampling, the distributions it
drew them from); the engine verifies them with the target and commits the outcome
to the drafter, which rolls its own cache back. The engine keeps drafter and target
rows in step: the same rows, admitted and removed together.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pipeline.engine.acceptance import SamplingConfig
from pipeline.engine.prompts import PreparedPrompt
from pipeline.engine.target import TargetPrefill


class Drafter(Protocol):
    name: str
    kind: str
    reads_target_hidden_states: bool  # the target then returns its last hidden states from prefill and verify

    def prefill(
        self,
        prompts: list[PreparedPrompt],
        target: TargetPrefill,  # what the target's prefill of these rows computed: image features, positions,
        # and its last hidden states when the drafter reads them
        first_tokens: torch.Tensor,  # [B] the target's first generated token per row
        append: bool = False,  # these rows join the rows already drafting (continuous batching)
    ) -> None: ...

    @property
    def prefill_waits(self) -> bool:
        """Rows wait for `prefill_put_off` (drafting for them now would pay their prefill)."""
        ...

    def prefill_put_off(self) -> int:
        """Prefill the rows whose prefill the drafter put off until a draft needs them; returns how many it prefilled.
        `propose` does it too; the engine calls it first to time it as prefill (and tells gamma's policy what it
        cost). A drafter that puts nothing off does nothing and returns 0."""
        ...

    def propose(
        self, k: int, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k >= 1 draft tokens [B, k] and, when sampling, their distributions [B, k, target vocab]."""
        ...

    def commit(
        self,
        k: int,  # drafts proposed per row this step (0: the drafter was not called)
        num_accepted: torch.Tensor,  # [B] on the host: drafts the target accepted
        output_tokens: torch.Tensor,  # [B, k+1] on the host: emitted tokens, placeholder after num_accepted
        target_hidden_states: torch.Tensor | None,  # [B, k+1, H] of the verify forward, when the drafter reads them
    ) -> None:
        """Roll back the rejected drafts and take the emitted tokens as the rows' continuation."""
        ...

    def select_rows(self, rows: torch.Tensor) -> None: ...

    def fork(self) -> Drafter:
        """The same model with rows of its own (none yet): rows prefilled ahead of their admission wait in one."""
        ...

    def adopt_rows(self, other: Drafter, count: int, append: bool) -> None:
        """Move the last `count` rows of a fork after these rows (or, not append, in place of them)."""
        ...
