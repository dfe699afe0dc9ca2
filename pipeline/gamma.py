"""Choosing gamma (the draft length): fixed, or `auto` from measured acceptance and step costs.

With acceptance rate a, k drafts yield E(k) = (1 - a^(k+1)) / (1 - a) tokens per
step. A step costs T(k+1) (the target verifying k+1 tokens per row; flat while
memory-bound, growing with k at large batch) plus k drafter steps of cost c.
`auto` picks the k in [0, max_gamma] that maximises E(k) / (T(k+1) + k c),
using running averages of measured times, so when speculation does not pay
(large batch, poor drafter) it falls to k = 0: plain decoding. The regime not in
use is re-measured by an occasional probe step, at intervals that double while
the choice stays the same, so a settled choice costs almost nothing to confirm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class GammaPolicy:
    gamma: int | str = 3
    max_gamma: int = 8
    probe_every: int = 16  # first interval between re-measurements of the regime not in use
    max_probe_every: int = 256
    smoothing: float = 0.3  # weight of the newest measurement in running averages

    acceptance: float = 0.6  # prior until measured
    draft_s: float | None = None  # one drafter forward
    verify_s: dict[int, float] = field(default_factory=dict)  # tokens per row -> one target forward
    steps: int = 0
    _probe_interval: int = field(default=0, init=False, repr=False)
    _next_probe: int = field(default=0, init=False, repr=False)
    _last_best: int = field(default=-1, init=False, repr=False)

    def __post_init__(self):
        self.gamma = parse_gamma(self.gamma)
        self._probe_interval = self._next_probe = self.probe_every

    @property
    def auto(self) -> bool:
        return self.gamma == AUTO

    def choose(self) -> int:
        if not self.auto:
            return self.gamma
        if self.steps == 0:
            return 0  # measure plain decoding first
        if self.draft_s is None:
            return min(4, self.max_gamma)  # then a speculative step
        best = self.best_gamma()
        if best != self._last_best:  # the choice moved: watch more closely again
            self._last_best, self._probe_interval = best, self.probe_every
        if self.steps >= self._next_probe:  # keep the estimate of the other regime fresh
            self._next_probe = self.steps + self._probe_interval
            self._probe_interval = min(2 * self._probe_interval, self.max_probe_every)
            return 1 if best == 0 else 0
        return best

    def best_gamma(self) -> int:
        return max(range(self.max_gamma + 1), key=self.expected_rate)

    def expected_rate(self, k: int) -> float:
        """Predicted tokens per second per row with k drafts."""
        a = min(self.acceptance, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        return tokens / (self._verify_cost(k + 1) + k * (self.draft_s or 0.0))

    def observe(self, k: int, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.steps += 1
        self.verify_s[k + 1] = self._average(self.verify_s.get(k + 1), verify_s)
        if k > 0:
            self.draft_s = self._average(self.draft_s, draft_s / k)
            if drafted:
                self.acceptance = self._average(self.acceptance, accepted / drafted)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def _verify_cost(self, q: int) -> float:
        """T(q): interpolated linearly from the widths measured so far, and never below a narrower
        width's measurement (timing noise must not make verifying more tokens look cheaper)."""
        widths = sorted(self.verify_s)
        floor = max((self.verify_s[w] for w in widths if w <= q), default=0.0)
        if q in self.verify_s or len(widths) == 1:
            return max(self.verify_s.get(q, self.verify_s[widths[0]]), floor)
        lo = max([w for w in widths if w < q], default=widths[0])
        hi = min([w for w in widths if w > q], default=widths[-1])
        if lo == hi:  # extrapolate from the two nearest widths
            lo, hi = (widths[-2], widths[-1]) if q > widths[-1] else (widths[0], widths[1])
        slope = (self.verify_s[hi] - self.verify_s[lo]) / (hi - lo)
        return max(self.verify_s[lo] + slope * (q - lo), floor, 1e-9)
