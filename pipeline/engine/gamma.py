"""Choosing gamma (the draft length): fixed, or `auto` from measured acceptance and step costs.

With a_i the chance that draft i is accepted given drafts 1..i-1 were, k drafts yield
E(k) = 1 + sum_{j<=k} a_1 * ... * a_j tokens per step (acceptance usually falls along
the draft, so one average rate would overrate long drafts). A step costs T(k+1) (the
target verifying k+1 tokens per row, flat while memory-bound and growing with k at large
batch, plus the step's bookkeeping) plus k drafter forwards of cost c. `auto` picks the k in [0, max_gamma] that
maximises E(k) / (T(k+1) + k c). Costs depend on the batch size, which shrinks as rows
finish, so they are measured per batch-size bucket (powers of two); acceptance does
not, so it is shared. When speculation does not pay (large batch, poor drafter) it
falls to k = 0: plain decoding. The regime not in use is re-measured by an occasional
probe step, at intervals that double while the choice stays the same, so a settled
choice costs almost nothing to confirm.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.engine.stats import StepTimes

AUTO = "auto"


def parse_gamma(value: int | str) -> int | str:
    """'auto' or a non-negative int (from a flag or a config)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        gamma = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a non-negative integer or 'auto', got {value!r}") from None
    if gamma < 0:
        raise ValueError(f"gamma must be a non-negative integer or 'auto', got {value!r}")
    return gamma


def batch_bucket(batch_size: int) -> int:
    """1, 2-3, 4-7, 8-15, ... share cost measurements."""
    return max(batch_size, 1).bit_length()


@dataclass
class _BucketCosts:
    """Measured costs at one batch-size bucket, and when to probe the regime not in use there."""

    draft_s: float | None = None  # one drafter forward
    step_s: dict[int, float] = field(default_factory=dict)  # tokens verified per row -> StepTimes.besides_drafting_s
    steps: int = 0
    probe_interval: int = 0
    next_probe: int = 0
    last_best: int = -1


@dataclass
class GammaPolicy:
    gamma: int | str = 3
    max_gamma: int = 8
    probe_every: int = 16  # first interval between re-measurements of the regime not in use
    max_probe_every: int = 256
    smoothing: float = 0.3  # weight of the newest cost measurement in running averages
    memory: float = 0.98  # per speculative step, how much of the past acceptance counts stays
    prior_acceptance: float = 0.6  # per position, until measured
    margin: float = 0.1  # speculate only when it promises this much more than plain decoding (see best_gamma)

    # Acceptance per draft position, as decayed counts: drafts that reached position i (all before it
    # accepted) and how many of those were accepted.
    reached: list[float] = field(init=False)
    accepted: list[float] = field(init=False)
    buckets: dict[int, _BucketCosts] = field(default_factory=dict, init=False)
    _last_k: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        self.gamma = parse_gamma(self.gamma)
        self.reached = [0.0] * self.max_gamma
        self.accepted = [0.0] * self.max_gamma

    @property
    def auto(self) -> bool:
        return self.gamma == AUTO

    def choose(self, batch_size: int) -> int:
        if not self.auto:
            return self.gamma
        costs = self._costs(batch_size)
        if 1 not in costs.step_s:
            return 0  # measure plain decoding first
        if costs.draft_s is None:
            return min(4, self.max_gamma)  # then a speculative step
        best = self.best_gamma(batch_size)
        if best != costs.last_best:  # the choice moved: watch more closely again
            costs.last_best, costs.probe_interval = best, self.probe_every
        if costs.steps >= costs.next_probe:  # keep the estimate of the other regime fresh
            costs.next_probe = costs.steps + costs.probe_interval
            costs.probe_interval = min(2 * costs.probe_interval, self.max_probe_every)
            return 1 if best == 0 else 0
        return best

    def best_gamma(self, batch_size: int) -> int:
        """The k with the best predicted rate; 0 unless speculating beats plain decoding by the margin, since the
        model misses costs that grow with speculation (a batch drains to its slowest row; drafter catch-ups)."""
        best = max(range(1, self.max_gamma + 1), key=lambda k: self.expected_rate(k, batch_size))
        plain = self.expected_rate(0, batch_size)
        return best if self.expected_rate(best, batch_size) > (1 + self.margin) * plain else 0

    def acceptance_per_position(self) -> list[float]:
        """a_i, measured where drafts reached position i, else the last measured position's (or the prior)."""
        rates, last = [], self.prior_acceptance
        for reached, accepted in zip(self.reached, self.accepted):
            last = accepted / reached if reached >= 1.0 else last
            rates.append(last)
        return rates

    def expected_tokens(self, k: int) -> float:
        """E(k): tokens per step with k drafts."""
        tokens, survive = 1.0, 1.0
        for rate in self.acceptance_per_position()[:k]:
            survive *= min(rate, 0.999)
            tokens += survive
        return tokens

    def expected_rate(self, k: int, batch_size: int) -> float:
        """Predicted tokens per second per row with k drafts at this batch size."""
        costs = self._costs(batch_size)
        return self.expected_tokens(k) / (self._step_cost(costs, k + 1) + k * (costs.draft_s or 0.0))

    def observe(self, k: int, num_accepted: list[int], step: StepTimes) -> None:
        """One step at batch size len(num_accepted): k drafts per row, of which row i kept num_accepted[i]."""
        costs = self._costs(len(num_accepted))
        costs.steps += 1
        costs.step_s[k + 1] = self._average(costs.step_s.get(k + 1), step.besides_drafting_s)
        if k > 0:
            if self._last_k > 0:  # after plain steps, the drafter's catch-up reads many tokens: not a typical cost
                costs.draft_s = self._average(costs.draft_s, step.draft_s / k)
            self.reached = [r * self.memory for r in self.reached]
            self.accepted = [a * self.memory for a in self.accepted]
            for n, rows in Counter(num_accepted).items():
                for i in range(min(n + 1, k)):
                    self.reached[i] += rows
                for i in range(n):
                    self.accepted[i] += rows
        self._last_k = k

    def _costs(self, batch_size: int) -> _BucketCosts:
        bucket = batch_bucket(batch_size)
        if bucket not in self.buckets:
            self.buckets[bucket] = _BucketCosts(probe_interval=self.probe_every, next_probe=self.probe_every)
        return self.buckets[bucket]

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    @staticmethod
    def _step_cost(costs: _BucketCosts, q: int) -> float:
        """T(q): interpolated linearly from the widths measured so far, and never below a narrower
        width's measurement (timing noise must not make verifying more tokens look cheaper)."""
        step_s = costs.step_s
        widths = sorted(step_s)
        floor = max((step_s[w] for w in widths if w <= q), default=0.0)
        if q in step_s or len(widths) == 1:
            return max(step_s.get(q, step_s[widths[0]]), floor)
        lo = max([w for w in widths if w < q], default=widths[0])
        hi = min([w for w in widths if w > q], default=widths[-1])
        if lo == hi:  # extrapolate from the two nearest widths
            lo, hi = (widths[-2], widths[-1]) if q > widths[-1] else (widths[0], widths[1])
        slope = (step_s[hi] - step_s[lo]) / (hi - lo)
        return max(step_s[lo] + slope * (q - lo), floor, 1e-9)
