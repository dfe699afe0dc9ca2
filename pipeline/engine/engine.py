"""Batched speculative decoding: one target verification forward per step for the whole batch.

    prefill   target (image features computed once) and drafter; first token from the target
    step      draft k tokens -> verify [last, d1..dk] in one target forward -> accept ->
              rollback by per-row lengths -> emit; finished rows leave the batch

The running batch (batch.py) owns the rows and keeps target and drafter in step;
this module holds the loop, the step and the choice of gamma. With drafter=None
(or gamma 0) every step is a plain decoding step through the same code: the
in-house baseline. Greedy output equals the target's own greedy
output; sampled output follows the target's distribution (see acceptance.py).
KV memory per row stays within the longest row + gamma + 1 (+ a growth chunk),
however many drafts are rejected (see kv_cache.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from pipeline.engine.acceptance import SamplingConfig, accept_greedy, accept_sampled, logits_to_probs, sample_from
from pipeline.engine.batch import FINISH_LENGTH, FINISH_STOP, Row, RunningBatch
from pipeline.engine.drafter import Drafter
from pipeline.engine.gamma import GammaPolicy, parse_gamma
from pipeline.engine.prompts import PreparedPrompt
from pipeline.engine.stats import EngineTimes, SpecDecodeCounts, StepClock, StepTimes, synchronized_time
from pipeline.engine.target import Target

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "EngineConfig", "GenerationResult", "SpecDecodeEngine"]

ADMIT_WHEN_FREE = 4  # continuous batching: waiting rows join once a quarter of the batch is free (one prefill each)


@dataclass
class EngineConfig:
    gamma: int | str = 3  # draft length, or "auto"
    max_gamma: int = 8  # upper bound for "auto"
    max_new_tokens: int = 64
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks, memory tests)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        self.gamma = parse_gamma(self.gamma)
        if self.max_gamma < 1:
            raise ValueError(f"max_gamma must be at least 1, got {self.max_gamma}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    finish_reason: str
    counts: SpecDecodeCounts


class SpecDecodeEngine:
    def __init__(self, target: Target, drafter: Drafter | None = None, config: EngineConfig | None = None):
        self.target = target
        self.drafter = drafter
        self.config = config or EngineConfig()
        self.sampling = self.config.sampling
        self.gamma_policy = GammaPolicy(gamma=self.config.gamma if drafter else 0, max_gamma=self.config.max_gamma)
        self.times = EngineTimes()  # summed over generate calls; read (or replace) between them
        self.generator = torch.Generator(device=target.device)
        if self.sampling.seed is not None:
            self.generator.manual_seed(self.sampling.seed)
        else:
            self.generator.seed()

    def generate(
        self, prompts: list[PreparedPrompt], max_new_tokens: list[int] | None = None, max_batch_size: int | None = None
    ) -> list[GenerationResult]:
        """Generate for every prompt; rows are independent of each other's lengths and outcomes.

        With max_batch_size, at most that many rows decode at once and waiting rows join the running
        batch as others finish (continuous batching), so the batch stays full instead of draining to
        its slowest row.
        """
        start = time.perf_counter()
        eos = frozenset() if self.config.ignore_eos else self.target.eos_token_ids
        rows = [Row(self._budget(p, n), eos) for p, n in zip(prompts, max_new_tokens or [None] * len(prompts))]
        waiting = deque(i for i, row in enumerate(rows) if row.budget > 0)
        limit = max_batch_size or len(waiting)
        batch = RunningBatch(self.target, self.drafter)
        while waiting or batch:
            free = limit - len(batch)
            if waiting and free >= max(1, limit // ADMIT_WHEN_FREE):
                self._admit(batch, [waiting.popleft() for _ in range(min(free, len(waiting)))], prompts, rows)
                continue
            k = self.gamma_policy.choose(len(batch))
            batch_size = len(batch)
            step, num_accepted = self._step(batch, k)
            self.times.observe_step(k, batch_size, step)
            self.gamma_policy.observe(k, num_accepted, step)
        self.times.observe_generate(synchronized_time(self.target.device) - start)
        return [self._result(row) for row in rows]

    def _admit(self, batch: RunningBatch, indices: list[int], prompts: list[PreparedPrompt], rows: list[Row]) -> None:
        start = time.perf_counter()
        batch.admit([rows[i] for i in indices], [prompts[i] for i in indices], self._choose)
        self.times.observe_prefill(synchronized_time(self.target.device) - start)

    def _step(self, batch: RunningBatch, k: int) -> tuple[StepTimes, list[int]]:
        """One speculative step with k drafts per row; returns its times and the accepted count per row."""
        clock = StepClock(self.target.device)
        # Draft: k tokens per row (and their distributions when sampling).
        draft_tokens, draft_probs = batch.draft(k, self.sampling, self.generator)
        clock.lap("draft" if k else "verify")  # a plain step (k = 0) spends no time drafting

        # Verify: one target forward over [last, d1..dk] for the whole batch.
        target_logits = batch.verify(draft_tokens)

        # Accept: the pure acceptance rule; counts go to the host, where rollback lengths live.
        num_accepted, output_tokens = self._accept(draft_tokens, draft_probs, target_logits)
        num_accepted, output_tokens = num_accepted.cpu(), output_tokens.cpu()
        clock.lap("verify")

        # Rollback: target and drafter discard the rejected positions.
        batch.rollback(k, num_accepted, output_tokens)

        # Emit: each row takes its tokens; finished rows leave the batch.
        batch.emit(k, num_accepted, output_tokens)
        clock.lap("bookkeeping")
        return clock.times, num_accepted.tolist()

    def _accept(
        self,
        draft_tokens: torch.Tensor,  # [B, k]
        draft_probs: torch.Tensor | None,  # [B, k, V] when sampling with k > 0
        target_logits: torch.Tensor,  # [B, k+1, V]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [B], output_tokens [B, k+1]
        if self.sampling.greedy:
            return accept_greedy(draft_tokens, target_logits)
        target_probs = logits_to_probs(target_logits, self.sampling)
        if draft_probs is None:  # k = 0: plain sampling from the target
            draft_probs = target_probs[:, :0]
        return accept_sampled(draft_tokens, draft_probs, target_probs, self.generator)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sampling.greedy:
            return logits.argmax(dim=-1)
        return sample_from(logits_to_probs(logits, self.sampling), self.generator)

    def _budget(self, prompt: PreparedPrompt, max_new_tokens: int | None) -> int:
        budget = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if self.target.context_length is not None:
            budget = min(budget, self.target.context_length - len(prompt.input_ids))
        return max(budget, 0)

    def _result(self, row: Row) -> GenerationResult:
        row.counts.observe_tokens(len(row.tokens))
        text = self.target.tokenizer.decode(row.tokens, skip_special_tokens=True)
        return GenerationResult(tokens=row.tokens, text=text, finish_reason=row.finish_reason, counts=row.counts)
