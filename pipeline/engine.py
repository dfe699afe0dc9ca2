"""Batched speculative decoding: one target verification forward per step for the whole batch.

    prefill   target (image features computed once) and drafter; first token from the target
    loop      draft k tokens -> verify [last, d1..dk] in one target forward -> accept ->
              roll back by per-row lengths -> emit; finished rows leave the batch

With drafter=None (or gamma 0) every step is a plain decoding step through the
same code: the in-house baseline. Greedy output equals the target's own greedy
output; sampled output follows the target's distribution (see acceptance.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.acceptance import SamplingConfig, accept_greedy, accept_sampled, logits_to_probs, sample_from
from pipeline.gamma import GammaPolicy
from pipeline.stats import SpecDecodeCounts
from pipeline.target import PreparedPrompt, Target

FINISH_STOP = "stop"  # an end-of-sequence token
FINISH_LENGTH = "length"  # max_new_tokens or the target's context


@dataclass
class EngineConfig:
    gamma: int | str = 3  # draft length, or "auto"
    max_gamma: int = 8  # upper bound for "auto"
    max_new_tokens: int = 64
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks, memory tests)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    finish_reason: str
    counts: SpecDecodeCounts


class SpecDecodeEngine:
    def __init__(self, target: Target, drafter=None, config: EngineConfig | None = None):
        self.target = target
        self.drafter = drafter
        self.config = config or EngineConfig()
        self.sampling = self.config.sampling
        self.gamma_policy = GammaPolicy(gamma=self.config.gamma if drafter else 0, max_gamma=self.config.max_gamma)
        self.generator = torch.Generator(device=target.device)
        if self.sampling.seed is not None:
            self.generator.manual_seed(self.sampling.seed)
        else:
            self.generator.seed()

    def generate(
        self, prompts: list[PreparedPrompt], max_new_tokens: list[int] | None = None
    ) -> list[GenerationResult]:
        """Generate for every prompt; rows are independent of each other's lengths and outcomes."""
        start = time.perf_counter()
        budgets = [self._budget(p, n) for p, n in zip(prompts, max_new_tokens or [None] * len(prompts))]
        outputs: list[list[int]] = [[] for _ in prompts]
        counts = [SpecDecodeCounts(num_sequences=1) for _ in prompts]
        finish = [FINISH_LENGTH] * len(prompts)
        active = [i for i, b in enumerate(budgets) if b > 0]
        eos_token_ids = frozenset() if self.config.ignore_eos else self.target.eos_token_ids

        def emit(row: int, tokens: list[int]) -> bool:
            """Append tokens to a row, cut at EOS or its budget; True when the row is finished."""
            for token in tokens:
                outputs[row].append(token)
                if token in eos_token_ids:
                    finish[row] = FINISH_STOP
                    break
                if len(outputs[row]) >= budgets[row]:
                    break
            return finish[row] == FINISH_STOP or len(outputs[row]) >= budgets[row]

        if active:
            last_tokens = self._prefill([prompts[i] for i in active])
            done = [emit(row, [t]) for row, t in zip(active, last_tokens.tolist())]
            while active:
                active, last_tokens = self._drop_finished(active, last_tokens, done, counts, start)
                if not active:
                    break
                k = self.gamma_policy.choose()
                num_accepted, output_tokens, last_tokens = self._step(last_tokens, k)
                done = []
                for row, n, out in zip(active, num_accepted.tolist(), output_tokens.tolist()):
                    before = len(outputs[row])
                    done.append(emit(row, out[: n + 1]))
                    emitted = len(outputs[row]) - before
                    counts[row].observe_step(k, min(n, emitted))
        for c, tokens in zip(counts, outputs):
            c.observe_tokens(len(tokens))
            if not c.latency_s:
                c.latency_s = time.perf_counter() - start
        tokenizer = self.target.tokenizer
        return [
            GenerationResult(tokens=t, text=tokenizer.decode(t, skip_special_tokens=True), finish_reason=f, counts=c)
            for t, f, c in zip(outputs, finish, counts)
        ]

    def _prefill(self, prompts: list[PreparedPrompt]) -> torch.Tensor:
        prefill = self.target.prefill(prompts)
        first_tokens = self._choose(prefill.first_logits)
        if self.drafter is not None:
            self.drafter.prefill(prompts, prefill.image_features, first_tokens)
        return first_tokens

    def _step(self, last_tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One speculative step from last_tokens [B].

        Returns num_accepted [B] and output_tokens [B, k+1] on the CPU, and the new last tokens [B].
        """
        # Draft: k tokens per row (and their distributions when sampling).
        t0 = time.perf_counter()
        if k > 0:
            draft_tokens, draft_probs = self.drafter.propose(k, self.sampling, self.generator)
        else:
            draft_tokens, draft_probs = last_tokens.new_empty(len(last_tokens), 0), None
        t1 = synchronized_time(last_tokens.device)

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
        self.gamma_policy.observe(k, k * len(last_tokens), int(num_accepted.sum()), t1 - t0, t2 - t1)
        return num_accepted, output_tokens, next_tokens

    def _drop_finished(self, active, last_tokens, done, counts, start):
        if not any(done):
            return active, last_tokens
        now = time.perf_counter() - start
        for row, finished in zip(active, done):
            if finished:
                counts[row].latency_s = now
        keep = torch.tensor([j for j, finished in enumerate(done) if not finished], dtype=torch.long)
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
