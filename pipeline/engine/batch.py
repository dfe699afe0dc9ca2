"""The running batch: the rows decoding now, their last tokens, and target and drafter kept in step.

One object owns the batch. Rows join through `admit` (a prefill of the new rows,
appended after the running ones) or, prefilled ahead in a staging batch of their own
(`staging`), through `join`, and leave through `remove_finished`; every change of rows
is applied to the target, the drafter and the last tokens together, so they cannot
drift apart.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from pipeline.engine.acceptance import SamplingConfig
from pipeline.engine.drafter import Drafter
from pipeline.engine.prompts import PreparedPrompt
from pipeline.engine.stats import SpecDecodeCounts
from pipeline.engine.target import Target

FINISH_STOP = "stop"  # an end-of-sequence token
FINISH_LENGTH = "length"  # max_new_tokens or the target's context


class Row:
    """One sequence's output and counts while it decodes."""

    def __init__(self, budget: int, eos_token_ids: frozenset[int]):
        self.budget = budget
        self.eos_token_ids = eos_token_ids
        self.tokens: list[int] = []
        self.finish_reason = FINISH_LENGTH
        self.counts = SpecDecodeCounts(num_sequences=1)
        self.started = 0.0  # when it joined the batch
        # an attribute, set where it changes: the batch reads it for every row after every step (as a property, 8 us
        # a step at batch 32 on the demo world)
        self.finished = budget <= 0

    def emit(self, tokens: list[int]) -> int:
        """Append tokens up to an EOS token or the budget; returns how many were taken (every row, every step:
        kept short)."""
        if self.finish_reason == FINISH_STOP:
            return 0
        taken = tokens[: max(self.budget - len(self.tokens), 0)]
        for i, token in enumerate(taken):
            if token in self.eos_token_ids:
                taken = taken[: i + 1]
                self.finish_reason = FINISH_STOP
                break
        self.tokens += taken
        self.finished = self.finish_reason == FINISH_STOP or len(self.tokens) >= self.budget
        return len(taken)


class RunningBatch:
    def __init__(self, target: Target, drafter: Drafter | None):
        self.target = target
        self.drafter = drafter
        self.rows: list[Row] = []
        self.last_tokens: torch.Tensor | None = None  # [B] each row's newest token, not yet verified past
        # the target's hidden states are computed only for a drafter that reads them (MSD)
        self.hidden_states_wanted = drafter is not None and drafter.reads_target_hidden_states
        self.verified_hidden_states: torch.Tensor | None = None  # [B, k+1, H] of the last verify, when wanted

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, rows: list[Row], prompts: list[PreparedPrompt],
              choose: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Prefill these rows (after the running ones, if any) and emit their first tokens, chosen from the
        target's logits [B, V] by `choose`. All or nothing: when it raises, the running rows are as they were
        (the target's prefill appends only once its forward succeeded; the drafter's is undone)."""
        started = time.perf_counter()
        append = bool(self.rows)
        prefill = self.target.prefill(prompts, append=append, hidden_states=self.hidden_states_wanted)
        try:
            first_tokens = choose(prefill.first_logits)
            if self.drafter is not None:
                self.drafter.prefill(prompts, prefill, first_tokens, append=append)
        except Exception:  # all or nothing: the running rows go on as they were
            if append:
                self._select(torch.arange(len(self.rows)))
            raise
        for row, token in zip(rows, first_tokens.tolist()):
            row.started = started
            row.emit([token])
        self.rows = self.rows + rows
        self.last_tokens = torch.cat([self.last_tokens, first_tokens]) if append else first_tokens
        self.remove_finished()

    def staging(self) -> RunningBatch:
        """A batch of its own for the same models, where rows are prefilled ahead of joining this one."""
        return RunningBatch(self.target.fork(), self.drafter.fork() if self.drafter is not None else None)

    def join(self, staged: RunningBatch, count: int) -> None:
        """Move the last `count` rows of a staging batch (prefilled, first token emitted) after these rows, where
        they go on decoding: a copy of their caches, no forward."""
        append, keep = bool(self.rows), len(staged) - count
        self.target.adopt_rows(staged.target, count, append)
        if self.drafter is not None:
            self.drafter.adopt_rows(staged.drafter, count, append)
        joining = staged.last_tokens[keep:]
        self.rows = self.rows + staged.rows[keep:]
        self.last_tokens = torch.cat([self.last_tokens, joining]) if append else joining
        staged.rows, staged.last_tokens = staged.rows[:keep], staged.last_tokens[:keep] if keep else None

    @property
    def drafter_prefill_waits(self) -> bool:
        """The drafter has put off its prefill of these rows until a step drafts."""
        return self.drafter is not None and self.drafter.prefill_waits

    def prefill_put_off(self) -> int:
        """The drafter's prefill of the rows it put off until a step drafts (see CausalLMDrafter); how many rows."""
        return self.drafter.prefill_put_off() if self.drafter is not None else 0

    def draft(self, k: int, sampling: SamplingConfig, generator: torch.Generator | None):
        """k draft tokens per row [B, k] and, when sampling, their distributions (None for k = 0)."""
        if k == 0:
            return self.last_tokens.new_empty(len(self.rows), 0), None
        return self.drafter.propose(k, sampling, generator)

    def verify(self, draft_tokens: torch.Tensor) -> torch.Tensor:  # [B, k] -> target logits [B, k+1, V]
        """One target forward over [last token, drafts] of every row."""
        tokens = torch.cat([self.last_tokens[:, None], draft_tokens], dim=1)
        logits, self.verified_hidden_states = self.target.verify(tokens, hidden_states=self.hidden_states_wanted)
        return logits

    def rollback(
        self,
        k: int,
        num_accepted: torch.Tensor,  # [B] on the host
        output_tokens: torch.Tensor,  # [B, k+1] on the host, placeholder after num_accepted
    ) -> None:
        """Target and drafter discard the positions the target rejected."""
        if k > 0:  # a plain step rejects nothing
            self.target.rollback(k - num_accepted)
        if self.drafter is not None:
            self.drafter.commit(k, num_accepted, output_tokens, self.verified_hidden_states)

    def emit(
        self,
        k: int,
        num_accepted: torch.Tensor,  # [B] on the host
        output_tokens: torch.Tensor,  # [B, k+1] on the host
    ) -> list[int]:
        """Each row takes its accepted drafts and the recovered or bonus token; finished rows leave. Returns the
        accepted drafts each row kept: drafts past its EOS token or its budget were accepted to no use."""
        kept = []
        for row, n, out in zip(self.rows, num_accepted.tolist(), output_tokens.tolist()):
            kept.append(min(n, row.emit(out[: n + 1])))
            row.counts.observe_step(k, kept[-1])
        last = output_tokens.gather(1, num_accepted[:, None]).squeeze(1)
        self.last_tokens = last.to(self.target.device, non_blocking=True)
        self.remove_finished()
        return kept

    def remove_finished(self) -> None:
        """Finished rows leave the batch: target, drafter and last tokens alike. Each leaver's place goes to a
        running row from the end of the batch, so the caches copy only the rows that move, not the batch."""
        finished = [j for j, row in enumerate(self.rows) if row.finished]
        if not finished:
            return
        now = time.perf_counter()
        for j in finished:
            self.rows[j].counts.latency_s = now - self.rows[j].started
        remaining = len(self.rows) - len(finished)
        keep = list(range(remaining))
        movers = [j for j in range(remaining, len(self.rows)) if not self.rows[j].finished]
        for place, mover in zip([j for j in finished if j < remaining], movers):
            keep[place] = mover
        self.rows = [self.rows[j] for j in keep]
        if not keep:  # the next admission starts a new batch
            self.last_tokens = None
            return
        keep = torch.tensor(keep, dtype=torch.long)
        self._select(keep)
        self.last_tokens = self.last_tokens[keep.to(self.last_tokens.device)]

    def _select(self, rows: torch.Tensor) -> None:
        self.target.select_rows(rows)
        if self.drafter is not None:
            self.drafter.select_rows(rows)
