"""Speculative-decoding statistics as summable counts.

Counts add up across steps, rows, batches, actors and nodes; rates are computed
only when reporting. Vocabulary (see DESIGN.md): a step is one target
verification forward; tau = 1 + accepted / steps counts the recovered or bonus
token of each step; acceptance rate = accepted / drafted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    return [x + (shorter[i] if i < len(shorter) else 0) for i, x in enumerate(longer)]


@dataclass
class SpecDecodeCounts:
    """Counts for one sequence, or summed over many."""

    num_sequences: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    latency_s: float = 0.0

    def observe_step(self, num_drafted: int, num_accepted: int) -> None:
        """One verification step that drafted `num_drafted` tokens and accepted the first `num_accepted`."""
        self.num_steps += 1
        if not num_drafted:  # a plain step (every row, every step: kept short)
            return
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted
        drafted, accepted = self.drafted_per_position, self.accepted_per_position
        if len(drafted) < num_drafted:
            drafted += [0] * (num_drafted - len(drafted))
            accepted += [0] * (num_drafted - len(accepted))
        for i in range(num_drafted):
            drafted[i] += 1
        for i in range(num_accepted):
            accepted[i] += 1

    def observe_tokens(self, num_tokens: int) -> None:
        self.num_generated_tokens += num_tokens

    def observe(self, other: SpecDecodeCounts) -> None:
        """Add another sequence's (or aggregate's) counts into this one."""
        self.num_sequences += other.num_sequences
        self.num_generated_tokens += other.num_generated_tokens
        self.num_steps += other.num_steps
        self.num_drafted += other.num_drafted
        self.num_accepted += other.num_accepted
        self.drafted_per_position = _add_lists(self.drafted_per_position, other.drafted_per_position)
        self.accepted_per_position = _add_lists(self.accepted_per_position, other.accepted_per_position)
        self.latency_s += other.latency_s

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens emitted per verification step, 1 + accepted / steps (1.0 before any step)."""
        return 1.0 + self.num_accepted / self.num_steps if self.num_steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of the drafts at position i that were accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def report(self) -> dict:
        return {
            "sequences": self.num_sequences,
            "generated_tokens": self.num_generated_tokens,
            "steps": self.num_steps,
            "drafted": self.num_drafted,
            "accepted": self.num_accepted,
            "tau": round(self.mean_accepted_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_per_position": [round(x, 4) for x in self.acceptance_per_position],
        }


def synchronized_time(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class StepTimes:
    """One step's seconds, phase by phase; the one record both EngineTimes and the gamma policy read.

    draft: the drafter's forwards (catch-up included); verify: the target forward and the
    acceptance rule; bookkeeping: rollback, emitting tokens, finished rows leaving the batch.
    """

    draft_s: float = 0.0
    verify_s: float = 0.0
    bookkeeping_s: float = 0.0

    @property
    def besides_drafting_s(self) -> float:
        """What a step of this width costs whatever the drafter: verification plus bookkeeping."""
        return self.verify_s + self.bookkeeping_s


class StepClock:
    """Splits one step into phases with device-synchronised laps: `lap("draft")`, `lap("verify")`, ..."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times = StepTimes()
        self._last = synchronized_time(device)

    def lap(self, phase: str) -> None:
        now = synchronized_time(self.device)
        setattr(self.times, f"{phase}_s", getattr(self.times, f"{phase}_s") + now - self._last)
        self._last = now


@dataclass
class EngineTimes:
    """Where an engine's wall time went, summed over generate calls (per batch, not per row).

    Phases: prefill (target and drafter) and, per step, the phases of StepTimes: draft
    (drafter forwards), verify (the target forward and the acceptance rule) and
    bookkeeping (rollback, emit, finished rows leaving the batch). `other_s` is what
    the phases do not cover: bookkeeping plus admitting rows and the loop itself.
    """

    total_s: float = 0.0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    num_steps: int = 0
    num_draft_forwards: int = 0  # drafter forwards over the batch: k per step
    num_row_steps: int = 0  # rows in the batch, summed over steps (finished rows leave it)

    def observe_generate(self, seconds: float) -> None:
        self.total_s += seconds

    def observe_prefill(self, seconds: float) -> None:
        self.prefill_s += seconds

    def observe_step(self, k: int, rows: int, step: StepTimes) -> None:
        self.num_steps += 1
        self.num_row_steps += rows
        self.num_draft_forwards += k
        self.draft_s += step.draft_s
        self.verify_s += step.verify_s

    @property
    def other_s(self) -> float:
        return max(self.total_s - self.prefill_s - self.draft_s - self.verify_s, 0.0)

    @property
    def decode_s(self) -> float:
        """Everything after prefill: the speculative steps and their bookkeeping."""
        return max(self.total_s - self.prefill_s, 0.0)

    @property
    def seconds_per_draft_forward(self) -> float:
        return self.draft_s / self.num_draft_forwards if self.num_draft_forwards else 0.0

    @property
    def seconds_per_verify(self) -> float:
        return self.verify_s / self.num_steps if self.num_steps else 0.0

    @property
    def mean_rows_per_step(self) -> float:
        """How full the batch stayed: a batch runs until its slowest row is done, with the rest gone."""
        return self.num_row_steps / self.num_steps if self.num_steps else 0.0

    def shares(self) -> dict[str, float]:
        """Fraction of the total time in each phase."""
        total = self.total_s or 1.0
        return {"prefill": self.prefill_s / total, "draft": self.draft_s / total, "verify": self.verify_s / total,
                "other": self.other_s / total}
