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

import logging
import time
from collections import deque
from concurrent.futures import Future
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

log = logging.getLogger(__name__)

# continuous batching: waiting rows are prefilled once a quarter of the batch is free (or a whole batch waits)
ADMIT_WHEN_FREE = 4


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
        self._waiting: deque[_Request] = deque()  # submitted rows, in order, until `run` admits them
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
        its slowest row. A row the engine fails on raises its exception here (see `run` for isolation).
        """
        budgets = max_new_tokens or [None] * len(prompts)
        futures = [self.submit(prompt, budget) for prompt, budget in zip(prompts, budgets)]
        self.run(max_batch_size or len(prompts))
        return [future.result() for future in futures]

    def submit(self, prompt: PreparedPrompt, max_new_tokens: int | None = None) -> Future:
        """Queue one row (from any thread); the next `run` admits it. The future holds its GenerationResult, or
        the exception that row alone failed with."""
        future: Future = Future()
        future.set_running_or_notify_cancel()
        eos = frozenset() if self.config.ignore_eos else self.target.eos_token_ids
        request = _Request(prompt, self._budget(prompt, max_new_tokens), eos, future)
        if request.budget > 0:
            self._waiting.append(request)  # deque appends and pops are atomic: no lock
        else:
            request.resolve(self.target.tokenizer)
        return future

    @torch.inference_mode()  # no autograd state at all, where no_grad still keeps tensors' version counters and
    # view records: each of a step's many small ops costs less (the demo world's engine in turn, the same tokens:
    # 0.82-0.84x the time without a drafter at batch 1, 0.85-0.87x at 8; MASSV at gamma 6, batch 1, 0.86-0.87x)
    def run(self, max_batch_size: int) -> None:
        """Decode until no row waits or runs; rows submitted meanwhile join as others finish (continuous
        batching: at most max_batch_size rows decode at once).

        Waiting rows are prefilled ahead, up to max_batch_size together, into a staging batch (once one is
        needed: a quarter of the batch is free, or a whole batch's worth waits), and each moves into the
        running batch as soon as a place frees up: a prefill call has a fixed cost, so prefilling the few rows
        that fit at a time would cost more than the fuller batch gains. Staged rows hold only their prompts'
        KV, at most max_batch_size rows of it.

        Rows fail alone: a group whose prefill fails is admitted row by row, and when a step fails, each row
        of the batch is decoded again by itself; a row that fails alone gets its exception, the rest their
        results, the same as without the failure."""
        start = time.perf_counter()
        batch = RunningBatch(self.target, self.drafter)
        staged = batch.staging()
        admitted: dict[int, _Request] = {}  # staged or decoding, not finished yet, by id of their Row
        try:
            while self._waiting or batch or staged:
                free = max_batch_size - len(batch)
                if staged and free:
                    self._as_prefill(batch.join, staged, min(free, len(staged)))
                elif self._waiting and not staged and (
                        free >= max(1, max_batch_size // ADMIT_WHEN_FREE) or len(self._waiting) >= max_batch_size):
                    group = [self._waiting.popleft() for _ in range(min(max_batch_size, len(self._waiting)))]
                    for request in self._admit(staged, group):  # a row may finish on its first token
                        if not request.resolve(self.target.tokenizer):
                            admitted[id(request.row)] = request
                else:
                    # only the rows that finished are resolved: a pass over every row's future, each behind a lock,
                    # cost 2% of a plain step at batch 32 (and, after each step where a row finished, 1.5% of
                    # continuous batching's time there)
                    try:
                        for row in self._observed_step(batch, drains=not (self._waiting or staged)):
                            admitted.pop(id(row)).resolve(self.target.tokenizer)
                    except Exception as error:
                        log.warning("a step of %d rows failed (%s); decoding each of them alone", len(batch), error)
                        for row in batch.rows:
                            self._run_alone(admitted.pop(id(row)).restarted())
                        for key in [key for key, request in admitted.items() if request.resolve(self.target.tokenizer)]:
                            del admitted[key]  # rows the failed step finished before it failed
                        batch = RunningBatch(self.target, self.drafter)  # the old one's state is undefined now
        except BaseException as error:  # a fault of the engine's own, not of a row: no caller may wait forever
            for request in [*admitted.values(), *self._waiting]:
                request.fail(error)
            self._waiting.clear()
            raise
        self.times.observe_generate(synchronized_time(self.target.device) - start)

    def _as_prefill(self, work, *args) -> tuple[object, float]:
        """Admission work outside `_admit` (staged rows joining, the drafter's put-off prefill): timed as prefill.
        Returns what the work returned and its seconds."""
        start = time.perf_counter()
        result = work(*args)
        seconds = synchronized_time(self.target.device) - start
        self.times.observe_prefill(seconds)
        return result, seconds

    def _admit(self, batch: RunningBatch, group: list[_Request]) -> list[_Request]:
        """Prefill the group into the batch; returns the requests that joined. A group that fails is
        admitted row by row; a row that fails alone finishes with its exception."""
        start = time.perf_counter()
        try:
            batch.admit([r.row for r in group], [r.prompt for r in group], self._choose)
            joined = group
        except Exception as error:
            if len(group) == 1:
                log.warning("a row failed to start: %s: %s", type(error).__name__, error)
                group[0].fail(error)
                return []
            log.warning("a prefill of %d rows failed (%s); admitting them one at a time", len(group), error)
            return [request for one in group for request in self._admit(batch, [one])]
        self.times.observe_prefill(synchronized_time(self.target.device) - start)
        self.gamma_policy.observe_prefill()
        return joined

    def _run_alone(self, request: _Request) -> None:
        """Decode one row in a batch of its own, to completion or to its own failure."""
        batch = RunningBatch(self.target, self.drafter)
        try:
            if self._admit(batch, [request]):
                while batch:
                    self._step(batch, self.gamma_policy.choose(1))
        except Exception as error:
            log.warning("a row failed alone: %s: %s", type(error).__name__, error)
            request.fail(error)
            return
        request.resolve(self.target.tokenizer)

    def _observed_step(self, batch: RunningBatch, drains: bool) -> list[Row]:
        """A step with the policy's gamma (drains: no row waits to join the batch); its times go to the engine's
        totals and to the policy. Returns the rows that finished (and left the batch)."""
        batch_size, rows = len(batch), batch.rows
        k = self.gamma_policy.choose(batch_size, batch.drafter_prefill_waits, [len(row.tokens) for row in rows],
                                     drains)
        if k:  # a drafter may have put its prefill off until a step drafts (a step's time is the step's alone)
            prefilled, seconds = self._as_prefill(batch.prefill_put_off)
            if prefilled:
                self.gamma_policy.observe_drafter_prefill(batch_size, prefilled, seconds)
        step, num_accepted = self._step(batch, k)
        self.times.observe_step(k, batch_size, step)
        self.gamma_policy.observe(k, num_accepted, step)
        if len(batch) == batch_size:
            return []
        finished = [row for row in rows if row.finished]
        self.gamma_policy.observe_finished([len(row.tokens) for row in finished])
        return finished

    def _step(self, batch: RunningBatch, k: int) -> tuple[StepTimes, list[int]]:
        """One speculative step with k drafts per row; returns its times and the accepted drafts each row kept."""
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
        kept = batch.emit(k, num_accepted, output_tokens)
        clock.lap("bookkeeping")
        return clock.times, kept

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


@dataclass
class _Request:
    """A submitted row: its prompt, its Row while it decodes, and the future its caller waits on."""

    prompt: PreparedPrompt
    budget: int
    eos: frozenset[int]
    future: Future
    row: Row = field(init=False)

    def __post_init__(self):
        self.row = Row(self.budget, self.eos)

    def restarted(self) -> _Request:
        """The same request with its progress discarded, to decode again from its prompt."""
        self.row = Row(self.budget, self.eos)
        return self

    def resolve(self, tokenizer) -> bool:
        """Give the future the row's result once the row has finished; True once the future is done."""
        if not self.future.done() and self.row.finished:
            row = self.row
            row.counts.observe_tokens(len(row.tokens))
            text = tokenizer.decode(row.tokens, skip_special_tokens=True)
            self.future.set_result(GenerationResult(row.tokens, text, row.finish_reason, row.counts))
        return self.future.done()

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
