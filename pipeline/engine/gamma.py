"""Choosing gamma (the draft length): fixed, or `auto` from measured acceptance and measured step times.

With a_i the chance that draft i is accepted given drafts 1..i-1 were, k drafts yield
E(k) = 1 + sum_{j<=k} a_1 * ... * a_j tokens per step (acceptance usually falls along
the draft, so one average rate would overrate long drafts). `auto` picks the k in
[0, max_gamma] that maximises E(k) / S(k), with S(k) the measured time of a whole step with
k drafts (drafting, verification and bookkeeping: what a step really costs, not a model
of it; the least of its last few steps, so one slow step does not decide). S is measured
per batch-size bucket (powers of two), since it depends on the batch size, which shrinks
as rows finish; acceptance does not, so it is shared. A k not measured
yet is predicted from the nearest measured one plus, per extra draft, one drafter forward
and the verification's measured growth per token; only the measured k and their
neighbours are candidates, so the choice climbs one step at a time and each step is
measured before the next. Plain decoding (k = 0) is measured first and is chosen unless
speculation promises a margin more, so a drafter that does not pay is not used. A
settled choice is re-checked by an occasional probe of a neighbour or of plain decoding,
at intervals that double while the choice stays the same.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from pipeline.engine.stats import StepTimes

AUTO = "auto"
# Step times kept per draft length and bucket; their minimum is S(k). A step costs its compute plus interference
# that only adds (a VM stall, a cache growth), so the least of the last few is the cost, and one slow step cannot
# raise it. A running average let one slow step stand for a draft length that is only measured again at the next
# probe (plain decoding held at 7.6 ms where it took 2.5, and speculation that lost 14% chosen over it); a median
# of 5 needed 3 good probes to forget a bad first measurement, which can take hundreds of steps. In a simulation
# with 3% of steps stalled 2-5x (24 seeds, the demo's MASSV costs at batch 1), the worst run reached 0.90 of the
# best fixed gamma's rate with this, 0.66 with a median of 5, 0.79 with the running average.
STEP_SAMPLES = 3


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
    """Measured costs at one batch-size bucket, and when to probe around the choice there."""

    step_samples: dict[int, deque] = field(default_factory=dict)  # drafts k -> the last whole steps' seconds
    verify_s: dict[int, float] = field(default_factory=dict)  # tokens verified per row -> besides_drafting_s
    draft_s: float | None = None  # one drafter forward
    steps: int = 0
    probe_interval: int = 0
    next_probe: int = 0
    last_best: int = -1
    probes: int = 0  # probes so far: they rotate over plain decoding and the choice's two neighbours

    @property
    def step_s(self) -> dict[int, float]:
        """S(k) per measured k: the least of its last STEP_SAMPLES steps."""
        return {k: min(samples) for k, samples in self.step_samples.items()}


@dataclass
class GammaPolicy:
    gamma: int | str = 3
    max_gamma: int = 8
    first_gamma: int = 3  # the first speculative k measured, once plain decoding has been
    probe_every: int = 16  # first interval between probes (plain decoding or a neighbour of the choice)
    max_probe_every: int = 256
    smoothing: float = 0.3  # weight of the newest measurement in the running averages of verify and draft times
    memory: float = 0.98  # per speculative step, how much of the past acceptance counts stays
    prior_acceptance: float = 0.6  # per position, until measured
    margin: float = 0.03  # speculate only when it promises this much more than plain decoding (timing noise)

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
        if 0 not in costs.step_samples:
            return 0  # measure plain decoding first
        if len(costs.step_samples) == 1:
            return min(self.first_gamma, self.max_gamma)  # then a speculative step
        best = self.best_gamma(batch_size)
        if best not in costs.step_samples:
            return best  # a neighbour that promises more: measure it
        if best != costs.last_best:  # the choice moved: watch more closely again
            costs.last_best, costs.probe_interval = best, self.probe_every
        if costs.steps >= costs.next_probe:  # keep the neighbours' times fresh
            costs.next_probe = costs.steps + costs.probe_interval
            costs.probe_interval = min(2 * costs.probe_interval, self.max_probe_every)
            costs.probes += 1
            # plain decoding too: the rate every choice must beat, kept fresh like the neighbours' (STEP_SAMPLES)
            targets = sorted({0, best - 1, best + 1} & set(range(self.max_gamma + 1)) - {best})
            return targets[(costs.probes - 1) % len(targets)]  # plain decoding first
        return best

    def best_gamma(self, batch_size: int) -> int:
        """The candidate k with the best predicted rate; 0 unless speculating beats plain decoding by the margin.
        Candidates: the measured k and their neighbours."""
        costs = self._costs(batch_size)
        measured = set(costs.step_samples) or {0}
        candidates = {c for k in measured for c in (k - 1, k, k + 1) if 1 <= c <= self.max_gamma}
        if not candidates:
            return 0
        best = max(sorted(candidates), key=lambda k: self.expected_rate(k, batch_size))
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
        return self.expected_tokens(k) / max(self.step_seconds(k, batch_size), 1e-9)

    def step_seconds(self, k: int, batch_size: int) -> float:
        """S(k): measured, or predicted from the nearest measured k (the lower one on a tie) plus, per draft more
        (or less), one drafter forward and the verification's growth per token (never negative); never below a
        measured shorter draft's (a step that drafts more does more work: timing noise must not say otherwise)."""
        costs = self._costs(batch_size)
        step_s = costs.step_s
        if not step_s:
            return 0.0
        if k in step_s:
            seconds = step_s[k]
        else:
            nearest = min(step_s, key=lambda m: (abs(m - k), m))
            seconds = step_s[nearest] + (k - nearest) * ((costs.draft_s or 0.0) + self._verify_growth(costs))
        return max([seconds, 1e-9, *(step_s[m] for m in step_s if m < k)])

    def observe(self, k: int, num_accepted: list[int], step: StepTimes) -> None:
        """One step at batch size len(num_accepted): k drafts per row, of which row i kept num_accepted[i]."""
        costs = self._costs(len(num_accepted))
        costs.steps += 1
        costs.verify_s[k + 1] = self._average(costs.verify_s.get(k + 1), step.besides_drafting_s)
        # after plain steps, the drafter's catch-up reads many tokens: not what a step with k drafts costs
        if k == 0 or self._last_k > 0:
            costs.step_samples.setdefault(k, deque(maxlen=STEP_SAMPLES)).append(step.draft_s + step.besides_drafting_s)
            if k > 0:
                costs.draft_s = self._average(costs.draft_s, step.draft_s / k)
        if k > 0:
            # only the positions this step drafted forget: a position beyond k keeps what it last measured (the
            # last measured position's rate stands in only for a position never measured, and acceptance falls
            # along a draft: letting a measured position fade into its predecessor's rate overrated longer drafts,
            # and auto kept trying them)
            for i in range(k):
                self.reached[i] *= self.memory
                self.accepted[i] *= self.memory
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
    def _verify_growth(costs: _BucketCosts) -> float:
        """Seconds the verification grows per verified token, from the widest two widths measured (0 before)."""
        widths = sorted(costs.verify_s)
        if len(widths) < 2:
            return 0.0
        lo, hi = widths[-2], widths[-1]
        return max((costs.verify_s[hi] - costs.verify_s[lo]) / (hi - lo), 0.0)
