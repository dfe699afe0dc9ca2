"""Batched speculative decoding: one target verification forward per step for the whole batch.

    prefill   target (image features computed once) and drafter; first token from the target
    loop      draft k tokens -> verify [last, d1..dk] in one target forward -> accept ->
              roll back by per-row lengths -> emit; finished rows leave the batch

With drafter=None (or gamma 0) every step is a plain decoding step through the
same code: the in-house baseline. Greedy output equals the target's own greedy
output; sampled output follows the target's distribution (see acceptance.py).
KV memory per row stays within the longest row + gamma + 1 (+ a growth chunk),
however many drafts are rejected (see kv_cache.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from pipeline.acceptance import SamplingConfig, accept_greedy, accept_sampled, logits_to_probs, sample_from
from pipeline.gamma import GammaPolicy, parse_gamma
from pipeline.stats import EngineTimes, SpecDecodeCounts
from pipeline.target import PreparedPrompt, Target

FINISH_STOP = "stop"  # an end-of-sequence token
FINISH_LENGTH = "length"  # max_new_tokens or the target's context
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


class _Row:
    """One sequence's output and counts while it decodes."""

    def __init__(self, budget: int, eos_token_ids: frozenset[int]):
        self.budget = budget
        self.eos_token_ids = eos_token_ids
        self.tokens: list[int] = []
        self.finish_reason = FINISH_LENGTH
        self.counts = SpecDecodeCounts(num_sequences=1)
        self.started = 0.0  # when it joined the batch

    @property
    def finished(self) -> bool:
        return self.finish_reason == FINISH_STOP or len(self.tokens) >= self.budget

    def emit(self, tokens: list[int]) -> int:
        """Append tokens up to an EOS token or the budget; returns how many were taken."""
        taken = 0
        for token in tokens:
            if self.finished:
                break
            self.tokens.append(token)
            taken += 1
            if token in self.eos_token_ids:
                self.finish_reason = FINISH_STOP
        return taken

    def result(self, tokenizer) -> GenerationResult:
        self.counts.observe_tokens(len(self.tokens))
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        return GenerationResult(tokens=self.tokens, text=text, finish_reason=self.finish_reason, counts=self.counts)


class SpecDecodeEngine:
    def __init__(self, target: Target, drafter=None, config: EngineConfig | None = None):
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
        rows = [_Row(self._budget(p, n), eos) for p, n in zip(prompts, max_new_tokens or [None] * len(prompts))]
        waiting = deque(i for i, row in enumerate(rows) if row.budget > 0)
        limit = max_batch_size or len(waiting)
        active, last_tokens = [], None
        while waiting or active:
            if waiting and limit - len(active) >= max(1, limit // ADMIT_WHEN_FREE):
                active, last_tokens = self._admit(waiting, limit, active, last_tokens, prompts, rows)
                continue
            k = self.gamma_policy.choose(len(active))
            step_start = time.perf_counter()
            num_accepted, output_tokens, last_tokens, draft_s = self._step(last_tokens, k)
            accepted = num_accepted.tolist()
            for i, n, out in zip(active, accepted, output_tokens.tolist()):
                emitted = rows[i].emit(out[: n + 1])
                rows[i].counts.observe_step(k, min(n, emitted))  # drafts cut off by EOS/budget do not count
            active, last_tokens = self._drop_finished(active, last_tokens, rows)
            # auto gamma weighs whole steps: verification and all bookkeeping count against the width
            self.gamma_policy.observe(k, accepted, draft_s, time.perf_counter() - step_start - draft_s)
        self.times.observe_generate(synchronized_time(self.target.device) - start)
        return [row.result(self.target.tokenizer) for row in rows]

    def _admit(self, waiting: deque, limit: int, active: list[int], last_tokens, prompts, rows):
        """Prefill waiting rows up to the batch limit; they join the running batch (or start a new one)."""
        admitted = [waiting.popleft() for _ in range(min(limit - len(active), len(waiting)))]
        started = time.perf_counter()
        for i in admitted:
            rows[i].started = started
        first_tokens = self._prefill([prompts[i] for i in admitted], append=bool(active))
        for i, token in zip(admitted, first_tokens.tolist()):
            rows[i].emit([token])
        if active:
            active, first_tokens = active + admitted, torch.cat([last_tokens, first_tokens])
        else:
            active = admitted
        return self._drop_finished(active, first_tokens, rows)

    def _prefill(self, prompts: list[PreparedPrompt], append: bool) -> torch.Tensor:
        start = time.perf_counter()
        prefill = self.target.prefill(prompts, append=append)
        first_tokens = self._choose(prefill.first_logits)
        if self.drafter is not None:
            self.drafter.prefill(prompts, prefill.image_features, first_tokens, append=append)
        self.times.observe_prefill(synchronized_time(first_tokens.device) - start)
        return first_tokens

    def _step(self, last_tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """One speculative step from last_tokens [B].

        Returns num_accepted [B] and output_tokens [B, k+1] on the CPU, the new last tokens [B], and the
        seconds spent drafting.
        """
        # Draft: k tokens per row (and their distributions when sampling).
        t0 = time.perf_counter()
        if k > 0:
            draft_tokens, draft_probs = self.drafter.propose(k, self.sampling, self.generator)
            t1 = synchronized_time(last_tokens.device)
        else:
            draft_tokens, draft_probs = last_tokens.new_empty(len(last_tokens), 0), None
            t1 = t0

        # Verify: one target forward over [last, d1..dk] for the whole batch.
        target_logits = self.target.verify(torch.cat([last_tokens[:, None], draft_tokens], dim=1))

        # Accept: the pure acceptance rule.
        if self.sampling.greedy:
            num_accepted, output_tokens = accept_greedy(draft_tokens, target_logits)
        else:
            target_probs = logits_to_probs(target_logits, self.sampling)
            if k == 0:
                draft_probs = target_probs[:, :0]
            num_accepted, output_tokens = accept_sampled(draft_tokens, draft_probs, target_probs, self.generator)
        t2 = synchronized_time(last_tokens.device)

        # Roll back: each row keeps its last token and its accepted drafts (lengths live on the host).
        next_tokens = output_tokens.gather(1, num_accepted[:, None]).squeeze(1)
        num_accepted, output_tokens = num_accepted.cpu(), output_tokens.cpu()
        self.target.keep(num_accepted + 1)
        if self.drafter is not None:
            self.drafter.commit(num_accepted, output_tokens)
        self.times.observe_step(k, len(last_tokens), t1 - t0, t2 - t1)
        return num_accepted, output_tokens, next_tokens, t1 - t0

    def _drop_finished(self, active: list[int], last_tokens: torch.Tensor, rows: list[_Row]):
        """Finished rows leave the batch (target, drafter and last tokens alike)."""
        keep = [j for j, i in enumerate(active) if not rows[i].finished]
        if len(keep) == len(active):
            return active, last_tokens
        for i in active:
            if rows[i].finished:
                rows[i].counts.latency_s = time.perf_counter() - rows[i].started
        keep = torch.tensor(keep, dtype=torch.long)
        if len(keep):
            self.target.select_rows(keep)
            if self.drafter is not None:
                self.drafter.select_rows(keep)
        return [active[j] for j in keep.tolist()], last_tokens[keep.to(last_tokens.device)]

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sampling.greedy:
            return logits.argmax(dim=-1)
        return sample_from(logits_to_probs(logits, self.sampling), self.generator)

    def _budget(self, prompt: PreparedPrompt, max_new_tokens: int | None) -> int:
        budget = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if self.target.context_length is not None:
            budget = min(budget, self.target.context_length - len(prompt.input_ids))
        return max(budget, 0)


def synchronized_time(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
