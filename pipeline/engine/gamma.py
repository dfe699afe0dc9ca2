"""Choosing gamma (the draft length): fixed, or `auto` from measured acceptance and measured step times.

With a_i the chance that draft i is accepted given drafts 1..i-1 were, k drafts yield
E(k) = 1 + sum_{j<=k} a_1 * ... * a_j tokens per step (acceptance usually falls along
the draft, so one average rate would overrate long drafts). `auto` picks the k in
[0, max_gamma] that maximises E(k) / S(k), with S(k) the measured time of a whole step with
k drafts (drafting, verification and bookkeeping: what a step really costs, not a model
of it, timed against the machine's speed just before, see STEP_SAMPLES). S is measured
per batch-size bucket (powers of two), since it depends on the batch size, which shrinks
as rows finish; acceptance is learnt overall and per bucket (see `reached`). A k not measured
yet is predicted from the nearest measured one plus, per extra draft, one drafter forward
and the verification's measured growth per token; only the measured k and their
neighbours are candidates, so the choice climbs one step at a time and each step is
measured before the next. Plain decoding (k = 0) is measured first (see PLAIN_TIMINGS) and is chosen unless speculation
promises a margin more, so a drafter that does not pay is not used. A settled choice is re-checked by an occasional
probe of a neighbour or of plain decoding, measured against the choice's steps around it (the choice's own timing holds
still: see _BucketCosts.anchors), at intervals that double while the choice stays the same, and never so often that what
the probes are predicted to lose exceeds `exploration` of the time (see _probe_loss), or, while plain decoding is the
choice and drafting is predicted to gain on fewer than a full set of timings, that share plus the gain (see _probe).
Speculation must beat plain decoding by a margin plus the standard error of the step times compared, from how far this
machine's timings stray (see best_gamma);
plain decoding chosen by less than one timing's noise on a draft length timed once times it again at once (see _decide).
A choice holds REDECIDE steps (one of plain decoding until a step drafts: nothing it rests on changes meanwhile but the
machine's speed, and the tokens left, which only make a switch dearer), and is made again at once when rows join (a
static batch's next one, where a switch to drafting has the most tokens left to pay for itself) or when the drafter
falls behind; a choice to draft made while it was behind stands once it has caught up (see choose).

A step's time is not all that drafting costs: a switch from plain decoding to drafting costs once. A drafter puts its
prefill off until a step drafts (drafters/put_off.py), so it prefills each row once, and only if the row is drafted
for; and the first drafting step after plain ones catches the drafter up on the tokens decoded meanwhile. While the
drafter is behind, what the switch costs (the measured put-off prefill of the batch, the measured catch-up) is spread
over the tokens the rows have left and added to every k > 0; once paid, it is paid; and where a static batch drains
into a bucket that would draft, it is paid on the way down whatever the bucket above does, so there it is not
drafting's cost (see choose). A row's tokens left are its expected length, given what it has emitted, from the
lengths of finished rows, less what it has emitted: a static batch's tail is its longest rows' last tokens (text-only
at batch 32 on the demo world: at 14 rows about 10 tokens a row were left, 3 steps with 3 drafts, over which the
drafter's prefill, 2.0 ms, and its catch-up, 0.7 ms, cost what drafting saved; spread over whole rows, 24 tokens, the
switch looked cheap and `auto` drafted there at 0.90x plain decoding).

In a static batch's drain (no row joins before it empties) the batch steps until its slowest row is done, and drafting
spreads how many steps a row takes for its tokens left: there drafting's rate is divided by how much later than plain
decoding's it expects the slowest row to end (see _rates). Whether rows end together is in their lengths: the demo
world's answers are 14, 22 or 30 tokens, so at a batch's start plain decoding's end is as uncertain and drafting adds
little, while its last rows all end at 30. Text-only at a static batch of 8 there drafted in the tail, where a token was
1.27x cheaper a step at 2-3 rows, and 1.08x over the tail. The offline replay (`jobs/replay_gamma.py`, 64 seeds, batch
8 / 32, against plain decoding), before -> after: text-only 0.980 / 0.952 -> 0.985 / 0.960, MSD 1.019 / 0.962 -> 1.019 /
0.980, MASSV 1.142 / 0.993 -> 1.145 / 0.983; in the engine within the runs' spread at batch 8 (docs/journal.md, the
twenty-seventh session).

Below a bucket whose choice drafts, a static batch that drafted its last step goes on drafting unless plain decoding
beats drafting there by the margin plus the standard error: drafting pays at least as well with fewer rows (a
verification costs less as the batch shrinks, a draft no more), and a drain passes through its small buckets in a few
steps a batch, too few timings for drafting to clear the bar there on their own (see _drafts_above).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist

from pipeline.engine.stats import StepTimes

AUTO = "auto"
# S(k) relative to the machine's speed now (one speed for every bucket: _MachineSpeed). A VM's speed drifts by up to
# +-40% over seconds (the same row's plain steps averaged 1.05 ms in one pass over the demo prompts and 1.88 ms in the
# next), so steps of different k timed at different moments do not compare: the least of each k's last 3 steps (used
# before) set a probe's time, taken hundreds of steps apart, against the choice's own recent steps: text-only at batch
# 1, auto decoded plainly on most steps and drafted 4-6 on the rest where 2-3 were 1.1x faster (0.96x plain decoding).
# So the steady steps (the same bucket and k as the timed step before) track the machine's speed, and each timed step
# is measured against the speed just before it: log S(k) is the mean of its last STEP_SAMPLES relative log times, those
# more than STALL times the least left out (a stall is interference, not the cost of k drafts; the least alone rated
# speculation too well, since a step that drafts spreads wider than a plain one: text-only, batch 32, least 6.0 ms and
# mean 8.2 with 3 drafts, 2.7 and 3.3 plain). A probe needs no anchor in time: it is set against the choice's steps
# around it.
STEP_SAMPLES = 6
STALL = 2.0
SPEED_SMOOTHING = 0.3  # weight of a steady step in the machine's speed
BUCKET_REACHED = 8.0  # decayed drafts reaching a position at a bucket before the bucket's own rate counts
# Plain steps right after drafting ones run slower than plain steps after plain ones (text-only, batch 1, a run of plain
# steps every 24 drafting ones: +26%, +12%, +7%, +8%, +6%, +4% against a plain engine's, medians); timed as plain
# decoding's cost, they made it look slower than it is whenever drafting was the choice. So the first SETTLE plain
# steps after drafting are not timed, and a probe of plain decoding lasts SETTLE + 1 steps.
SETTLE = 2
ANCHOR_SAMPLES = 2  # timings of a choice to draft before its steps set the machine's speed (see _BucketCosts.anchors)
REDECIDE = 8  # steps a bucket's choice holds before it is made again (unless a probe falls due, the drafter's state
# changes or rows join): made every step it cost 48 us a step at batch 32 on the demo world, 2% of a plain step (15 us
# in a loop); so does the choice to decode plainly like a neighbouring bucket (made every step, it cost 34 us a step
# with MSD). Every 4 steps, a choice (62-76 us inside a run) still cost about 1.5% of text-only's time at batch 1; every
# 8, in the bench's regime against every 4 (docs/journal.md, the thirteenth session): text-only at batch 1 1.016 and
# 1.010x, at batch 32 1.027 and 1.030x (fewer choices made on a noisy timing), MSD at batch 8 0.998 and 1.031x, the rest
# within 1%
# A probe of drafting while plain decoding is the choice times this many steps when drafting is predicted to gain but
# not by enough to trust (see best_gamma): what it costs is the switch (the drafter's put-off prefill, a catch-up),
# which more steps share. It adds one timing of drafting, as a one-step probe does (its later steps are steady ones:
# they track the machine's speed), but leaves the drafter prefilled and caught up, so the next choice rates drafting
# without the switch. With one step a probe, MSD at batch 8 on the demo world (drafting worth 1.2x plain decoding
# there) decoded plainly in 3 of 4 bench runs.
CONTENDER_STEPS = 3
# Plain decoding's timings at a bucket before drafting is first timed there, its level their mean: drafting's first
# timings are set against it. Set by one plain step (the later ones only tracked the machine's speed), the first
# drafting steps, and the at-once recheck of a length timed once, were all measured against that one step: MSD at a
# static batch of 8 on the demo world read 3 drafts at 2.62-3.27 plain steps over eight fresh policies (the truth that
# day 3.0), each recheck following its first timing (3.17 -> 3.27, 3.03 -> 3.15), and 12 of 48 policies decoded
# plainly on most steps at 8 rows, where drafting ran 1.15-1.30x plain decoding; with 3 (and a contender's standard
# error from the length it is predicted from, see _contender), 1 of 48 (docs/journal.md, the thirtieth session). Where
# the batch drains only: under continuous batching a first choice of plain decoding at the top bucket stays (drafting
# would pay the waiting rows' drafter prefill), and with these two MASSV at 32 rows decoded plainly in most fresh
# policies, 3.5 points slower than the code before over six rounds, where the policies that drafted ran 3-5% faster.
PLAIN_TIMINGS = 3
FIRST_GAMMA = 3  # the draft length a bucket times first, once plain decoding has been
PAIR_GAP = SETTLE + 1  # steps apart that are still "just before" (steps after a change to or from plain are not timed)
# What a step of the slowest rows, once the others are done, costs against a step of the whole batch: it has fewer
# rows. Drafting steps on the demo world (the replay's recording, 8 drafts): 1 row against 2 0.70-0.76, 4 against 8
# 0.75-0.83, 16 against 32 0.64-0.66 (see _rates). In the replay within a point of 0.5 and 1.0.
STRAGGLER_STEP = 0.7
# The standard error that drafting must clear (see best_gamma) is that of the machine's own timings: the spread of
# its steady steps around the speed just before them, `step_spread` (this VM's) worth PRIOR_RESIDUALS of them, each
# counting with weight RESIDUAL_MEMORY once there are more. Assumed at 15%, a machine whose steps time alike (a GPU's)
# would hold drafting back wherever it gains under 12% (the margin plus the error of six timings a side): the replay
# (`jobs/replay_gamma.py`, 32 seeds) of a machine with 1% spread, against the best fixed gamma, MSD at batch 8 0.931
# -> 0.962, text-only at batch 1 0.979 -> 0.988, the rest within a point or better; with this VM's noise (10% spread,
# drift, stalls) each configuration within 0.3 points, and in the engine here (`jobs/gamma_truth.py`, two rounds of
# six policies a side) within one point (docs/journal.md, the twenty-eighth session).
PRIOR_RESIDUALS = 20
RESIDUAL_MEMORY = 0.01
LENGTHS_KEPT = 512  # finished rows' lengths kept: their distribution says how many tokens a row has left


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


def _nearest(measured, k: int) -> int:
    """The measured draft length nearest k, the lower on a tie (what a prediction of k starts from)."""
    return min(measured, key=lambda m: (abs(m - k), m))


def _nearest_each(measured: list[int], count: int) -> list[int]:
    """_nearest of each k in 0..count-1, measured ascending (the nearest moves only up as k does)."""
    nearest, j = [], 0
    for k in range(count):
        while j + 1 < len(measured) and abs(measured[j + 1] - k) < abs(measured[j] - k):
            j += 1
        nearest.append(measured[j])
    return nearest


@lru_cache(maxsize=None)
def expected_maximum(rows: int) -> float:
    """The expected maximum of `rows` standard normal draws (Blom's approximation: 0.02 high at 2-4 rows, 0.589 against
    0.564 at 2; within 0.01 from 8 rows to 32)."""
    return NormalDist().inv_cdf((rows - 0.375) / (rows + 0.25)) if rows > 1 else 0.0


def batch_bucket(batch_size: int) -> int:
    """1, 2-3, 4-7, 8-15, ... share cost measurements."""
    return max(batch_size, 1).bit_length()


class RowLengths:
    """The latest finished rows' lengths, and how many tokens a row that has emitted t is expected to have left."""

    def __init__(self, kept: int = LENGTHS_KEPT):
        self.lengths: deque[int] = deque(maxlen=kept)
        self.counts: Counter[int] = Counter()  # of the kept lengths, kept as they come and go (counted afresh after
        # every finished row at batch 1, where a row finishes every few steps, they took a tenth of the policy's time)
        self._left: list[float] | None = []  # per t: E[length - t | length > t]; None until recomputed
        self._variance: list[float] = []  # per t: Var[length | length > t]

    def observe(self, lengths: Sequence[int]) -> None:
        for length in lengths:
            if len(self.lengths) == self.lengths.maxlen:  # the oldest goes as this one comes
                oldest = self.lengths[0]
                self.counts[oldest] -= 1
                if not self.counts[oldest]:
                    del self.counts[oldest]
            self.lengths.append(length)
            self.counts[length] += 1
            self._left = None

    def mean_left(self, emitted: Sequence[int]) -> float | None:
        """Mean over the rows of the tokens each has left (at least 1); None before any row has finished."""
        if not self.lengths:
            return None
        self._extend(emitted)
        return sum(map(self._left.__getitem__, emitted)) / max(len(emitted), 1)  # (each step decides: kept cheap)

    def left_variance(self, emitted: Sequence[int]) -> float | None:
        """Mean over the rows of the variance of the tokens each has left; None before any row has finished."""
        if not self.lengths:
            return None
        self._extend(emitted)
        return sum(map(self._variance.__getitem__, emitted)) / max(len(emitted), 1)

    def _extend(self, emitted: Sequence[int]) -> None:
        """The tables built, and long enough for these rows (one longer than any row seen is about to end)."""
        if self._left is None:
            self._build()
        if emitted and max(emitted) >= len(self._left):
            more = max(emitted) + 1 - len(self._left)
            self._left += [1.0] * more
            self._variance += [0.0] * more

    def _build(self) -> None:
        """Per t, over the rows longer than t: their mean length less t (at least 1) and their lengths' variance;
        rebuilt for the first decision after a row finishes (kept lean: at batch 8 on the demo world that is a third of
        the decisions)."""
        get, longest = self.counts.get, max(self.counts)
        left, variance, rows, tokens, squares = [1.0] * (longest + 1), [0.0] * (longest + 1), 0, 0, 0
        for t in range(longest, -1, -1):  # rows longer than t, their tokens and the tokens' squares
            if rows:
                mean = tokens / rows
                if mean - t > 1.0:
                    left[t] = mean - t
                variance[t] = max(squares / rows - mean * mean, 0.0)
            count = get(t)
            if count:
                rows, tokens, squares = rows + count, tokens + t * count, squares + t * t * count
        self._left, self._variance = left, variance


@dataclass
class _MachineSpeed:
    """How much slower than usual the machine runs now, one figure for every bucket: a bucket's cost measured against
    it has a reference even when the bucket's own last timed step is hundreds of steps old (a static batch spends its
    first steps at its top bucket, then drains through the others: the top bucket's times, set against its own
    speed of the batch before, mixed two moments of a VM whose speed drifts by tens of percent)."""

    log: float = 0.0  # log of how much slower than usual
    last_timed: tuple[int, int, int] | None = None  # (step, bucket, k) of the last timed step
    stalled: bool = False  # the last timed step was left out as a stall (see _BucketCosts.observe_step)
    residuals: int = 0  # steady steps timed against the speed just before them
    residual_square: float = 0.0  # the mean of their squared log residuals (the latest 1 / RESIDUAL_MEMORY, decayed)

    def observe_residual(self, residual: float) -> None:
        """A steady step's log time less its k's level and the speed just before: how far a timing strays."""
        self.residuals += 1
        weight = max(1.0 / self.residuals, RESIDUAL_MEMORY)
        self.residual_square += weight * (residual * residual - self.residual_square)

    def spread(self, prior: float) -> float:
        """How far a step's log time strays from its level at the speed just before: the steady steps' measured
        spread, with `prior` counted as PRIOR_RESIDUALS of them (a timed step of a probe is set against the speed just
        before it as a steady step is, so it strays as far)."""
        n = self.residuals
        return math.sqrt((PRIOR_RESIDUALS * prior * prior + n * self.residual_square) / (PRIOR_RESIDUALS + n))


@dataclass
class _BucketCosts:
    """Measured costs at one batch-size bucket, and when to probe around the choice there."""

    speed: _MachineSpeed = field(default_factory=_MachineSpeed)  # the policy's, shared by its buckets
    bucket: int = 1  # batch_bucket of the batch sizes it measures
    log_s: dict[int, float] = field(default_factory=dict)  # drafts k -> log S(k) at the machine's usual speed
    relative: dict[int, deque] = field(default_factory=dict)  # drafts k -> its last steps' log times, relative
    _table: tuple[tuple[float, int], list[float]] | None = None  # ((speed, steps) it was built at, S(0..max_gamma))
    verify_s: dict[int, float] = field(default_factory=dict)  # tokens verified per row -> besides_drafting_s
    reached: list[float] = field(default_factory=list)  # acceptance counts as GammaPolicy's, at this bucket only
    accepted: list[float] = field(default_factory=list)
    draft_s: float | None = None  # one drafter forward
    put_off_prefill_s: float | None = None  # the drafter's put-off prefill of the batch
    catch_up_s: float | None = None  # what the first drafting step after plain ones adds to its drafting
    settle_s: float | None = None  # what the SETTLE plain steps after drafting ones take beyond plain steps' time
    steps: int = 0
    probe_interval: int = 0
    next_probe: int = 0
    probe_losses: float = 0.0  # what the probes so far were predicted to lose, in steps (see _probe)
    checked: set[int] = field(default_factory=set)  # draft lengths timed once and probed for free since (see _probe)
    last_best: int = -1
    decided: tuple[int, int, bool] | None = None  # (steps when the choice was made, the choice, the drafter behind)
    drafted_before: int = 0  # the policy's drafting steps when the choice was made (see choose)
    would_draft: tuple[int, bool] | None = None  # (steps when judged, whether it would draft, drafter prefilled)
    plain_timings: int = 1  # plain decoding's timings before drafting's first (see PLAIN_TIMINGS)
    probe_turn: int = 0  # where the rotation over plain decoding and the choice's neighbours starts (see _probe):
    # after the last of them probed; a probe of drafting from plain decoding moves it on by one

    def observe_step(self, k: int, seconds: float, step: int) -> None:
        """A whole step with k drafts at this bucket, the policy's step number `step` (over every bucket), took
        `seconds`."""
        log_t, speed, bucket = math.log(max(seconds, 1e-9)), self.speed, self.bucket
        if k in self.log_s and log_t - self.log_s[k] - speed.log > math.log(STALL) and not speed.stalled:
            # a stall (interference, not the machine's speed): it neither sets the speed nor is a step "just before"
            # a probe's. Taken as the speed, one plain step of 2.9 ms (0.56 ms around it) at text-only's batch 8 on
            # the demo world read the machine 4.5x slow, a probe of 4 drafts three steps later was rated 0.49 ms (1.35
            # in truth), and that bucket drafted on for good at 0.92x plain decoding. Two in a row are the machine.
            speed.stalled = True
            return
        speed.stalled = False
        recent = speed.last_timed is not None and step - speed.last_timed[0] <= PAIR_GAP
        anchor = self.anchors(k)
        probe = self.decided is not None and not anchor
        if (recent and speed.last_timed[1:] == (bucket, k) and k in self.log_s and not probe
                and not self.timing_plain_first(k)):  # steady: the
            # machine's speed now
            residual = log_t - self.log_s[k] - speed.log
            speed.observe_residual(residual)
            speed.log += SPEED_SMOOTHING * residual
        elif (recent or speed.last_timed is None) and not anchor:  # a probe's step, a first timing or a change
            # before any choice here: this cost against the speed just before (the first timed step of all sets it)
            samples = self.relative.setdefault(k, deque(maxlen=STEP_SAMPLES))
            samples.append(log_t - speed.log)
            least = min(samples)
            usual = [r for r in samples if r <= least + math.log(STALL)]
            self.log_s[k] = sum(usual) / len(usual)
        elif k in self.log_s:  # the choice's step, or nothing just before to compare with: the speed is what this
            # step says
            speed.log = log_t - self.log_s[k]
        # (neither: a first timing here with nothing just before to set it against; the next step will have this one)
        speed.last_timed = (step, bucket, k)

    def anchors(self, k: int) -> bool:
        """k is the choice here, and measured: its steps set the machine's speed, and every timed step of a probe
        is measured against them, while the choice's own `log_s[k]` holds still. Timed at a change as a sample too,
        the choice's level moved with every probe: plain decoding's timed step after a probe of drafting runs about
        10% slow (see SETTLE), so each raised plain decoding's level, its steady steps then read the machine as that
        much faster, and drafting's samples trailed plain decoding's rising level. `jobs/gamma_truth.py` at batch 32
        (512 rows a pass, 3 fresh policies): S(3) / S(0) at 32-63 rows read 0.28 log cheap with text-only, 0.19 with
        MSD; measured against the choice, 0.06 and 0.04. A choice to draft timed once is not an anchor until its own
        next step has timed it again (a sample like a probe's): anchored on one timing, its level held still at a lucky
        step's, and as an anchor it counted as a full set of timings against which nothing could win (MSD at a static
        batch of 32 on the demo world drafted at 8-15 rows on one timing of 3 drafts at 2.31 plain steps, where other
        policies read 2.99-4.22, and ran 0.93x plain decoding). Plain decoding anchors at once: timed again as well,
        under continuous batching at 32 rows MSD's fresh policies ran 0.918x plain decoding against 0.933x (ten pairs
        in one turn, lower in 8), drafting only 0.908 against 0.899 (eight pairs, lower in 4)."""
        return (self.decided is not None and self.decided[1] == k and k in self.log_s
                and (k == 0 or len(self.relative.get(k, ())) >= ANCHOR_SAMPLES))

    def timing_plain_first(self, k: int) -> bool:
        """k is plain decoding, timed fewer than `plain_timings` times here before any choice: each such step is a
        sample of its level, not a steady step that tracks the machine's speed."""
        return k == 0 and self.decided is None and len(self.relative.get(0, ())) < self.plain_timings

    def timed_once(self, k: int) -> bool:
        """k was timed once here and not probed for free since: its one timing may have been a stall."""
        return len(self.relative.get(k, ())) == 1 and k not in self.checked

    def step_table(self, max_gamma: int) -> list[float]:
        """S(k) for k = 0..max_gamma at the speed now, in seconds (see GammaPolicy.step_seconds; zeros before any
        timing), built once per decision: a decision reads S ten times (its contender's rates, the probe's loss, the
        bucket below's choice), and read one k at a time, S took a third of a decision's time."""
        speed = self.speed.log
        if self._table is not None and self._table[0] == (speed, self.steps):  # a step since moves steps (GammaPolicy
            # .observe counts it before it times the step or averages its costs)
            return self._table[1]
        step_s = {m: math.exp(speed + log_s) for m, log_s in self.log_s.items()}
        table = [0.0] * (max_gamma + 1)
        if step_s:
            measured = sorted(step_s)
            drafting = [m for m in measured if m > 0]  # a drafting step's fixed costs are in these
            from_any = _nearest_each(measured, max_gamma + 1)
            from_drafting = _nearest_each(drafting, max_gamma + 1) if drafting else from_any
            per_draft = (self.draft_s or 0.0) + self.verify_growth(to_plain=False)
            floor = 1e-9  # the largest measured S(m) with m < k
            for k in range(max_gamma + 1):
                if k in step_s:
                    table[k] = max(step_s[k], step_s.get(0, 0.0), 1e-9)
                    floor = max(floor, step_s[k])
                    continue
                nearest = from_drafting[k] if k > 0 else from_any[k]
                k_per_draft = (self.draft_s or 0.0) + self.verify_growth(to_plain=True) if k == 0 else per_draft
                if 0 < k < nearest and 0 in step_s:  # fewer drafts than measured: a draft saves at most its share of
                    # what drafting adds to a plain step (the rest is the drafting step's fixed cost)
                    k_per_draft = min(k_per_draft, (step_s[nearest] - step_s[0]) / nearest)
                table[k] = max(step_s[nearest] + (k - nearest) * k_per_draft, floor)
        self._table = (speed, self.steps), table
        return table

    def verify_growth(self, to_plain: bool) -> float:
        """Seconds the verification grows per verified token, from the widest two widths measured (0 before); with
        drafts only, unless a plain step's cost is what is predicted. A step that drafts does more than verify one
        token more (the drafter's inputs, acceptance, rollback): MSD's step with one draft took 1.8 plain steps at 4-7
        rows, and with that in the growth per token a second draft was predicted at 2.6 and never measured (a
        prediction too kind is measured and corrected, one too harsh is not)."""
        widths = sorted(w for w in self.verify_s if to_plain or w > 1)
        if len(widths) < 2:
            return 0.0
        lo, hi = widths[-2], widths[-1]
        return max((self.verify_s[hi] - self.verify_s[lo]) / (hi - lo), 0.0)


@dataclass
class GammaPolicy:
    gamma: int | str = 3
    max_gamma: int = 8
    first_gamma: int = FIRST_GAMMA  # the first speculative k measured, once plain decoding has been
    probe_every: int = 16  # first interval between probes (plain decoding or a neighbour of the choice)
    max_probe_every: int = 64  # (256 before: see _neighbour_decodes_plainly)
    smoothing: float = 0.3  # weight of the newest measurement in the running averages of verify and draft times
    memory: float = 0.98  # per speculative step, how much of the past acceptance counts stays
    prior_acceptance: float = 0.6  # per position, until measured
    margin: float = 0.03  # speculate only when it promises this much more than plain decoding (timing noise) ...
    step_spread: float = 0.15  # ... plus the standard error of the two step times compared, a timing's spread
    # measured by the machine's steady steps with this as its prior (see best_gamma, PRIOR_RESIDUALS; 0: none)
    exploration: float = 0.005  # what probes may cost, as a share of the time between them (see _probe): at 1%,
    # text-only's probes at batch 1 on the demo world (where no gamma pays) cost 2-2.5% of its time, as each lost more
    # than predicted (a drafting step's time spreads, and is a mean of logs); at 0.5% 0.5-1%, and a replay of the demo
    # world (jobs/replay_gamma.py, 32 seeds) chose as well or better in every drafter and batch size

    # Acceptance per draft position, as decayed counts: drafts that reached position i (all before it
    # accepted) and how many of those were accepted. Each bucket keeps its own too: in a static batch a bucket is
    # a stretch of the answers (batch 32 their start, batch 1 the longest answers' end), and acceptance grows
    # along an answer (text-only on the demo world, 3 drafts: 2.24 tokens a row per step at 32-63 rows, 2.94 at
    # 16-31, 3.47 at 8-15): shared alone, the tail's acceptance made auto speculate at batch 32 at 0.88x plain.
    reached: list[float] = field(init=False)
    accepted: list[float] = field(init=False)
    buckets: dict[int, _BucketCosts] = field(default_factory=dict, init=False)
    _costs_of_size: dict[int, _BucketCosts] = field(default_factory=dict, init=False, repr=False)
    _last_k: int = field(default=0, init=False, repr=False)
    _plain_run: int = field(default=SETTLE, init=False, repr=False)  # plain steps in a row (none drafted before)
    _settling_s: float = field(default=0.0, init=False, repr=False)  # the SETTLE steps' extra time so far
    _probe_steps: list[int] = field(default_factory=list, init=False, repr=False)  # the rest of a probe
    row_lengths: RowLengths = field(default_factory=RowLengths, init=False, repr=False)
    _drafter_prefilled: bool = field(default=False, init=False, repr=False)  # just now: the next step catches up
    _steps: int = field(default=0, init=False, repr=False)  # over every bucket
    _drafting_steps: int = field(default=0, init=False, repr=False)  # over every bucket
    _after_prefill: bool = field(default=False, init=False, repr=False)
    _draining: bool = field(default=False, init=False, repr=False)  # the last choice's batch drains (see observe)
    _rows_before: int = field(default=0, init=False, repr=False)  # the last step's rows
    _speed: _MachineSpeed = field(default_factory=_MachineSpeed, init=False, repr=False)

    def __post_init__(self):
        self.gamma = parse_gamma(self.gamma)
        self.reached = [0.0] * self.max_gamma
        self.accepted = [0.0] * self.max_gamma

    @property
    def auto(self) -> bool:
        return self.gamma == AUTO

    def choose(self, batch_size: int, prefill_waits: bool = False, emitted: Sequence[int] | None = None,
               drains: bool = False) -> int:
        """k for the next step at this batch size; prefill_waits: the drafter has put its prefill of these rows off
        (drafting now would pay it); emitted: the tokens each row has emitted (what a switch to drafting is spread
        over depends on it; unknown: rows at their start); drains: no row will join the batch before it empties (a
        static batch), so it passes through the smaller buckets.

        A static batch draining into a bucket that would draft, paying the drafter's prefill over the rows' tokens left,
        pays it on its way down whatever it does here (for its rows then still running: a prefill costs mostly its
        call, text-only's 0.74 ms at 1 row, 2.2 ms at 32), so the choice here leaves it out (see
        _drains_into_drafting). Counted, it held MSD's batch 8 on the demo world on plain decoding at its top bucket
        for 60-78% of the steps (4-7 rows drafting, gamma 5 at 1.24x plain decoding): 0.875-0.906 of gamma 5's step
        time, and left out 0.924-0.941 (`jobs/gamma_truth.py --drafter msd --batch-size 8 --gammas 0,3,5 --reps 24`,
        three rounds in turn; the bucket below's last choice in its place drafted at text-only's batch 32 on a timing
        or two, and lost 2 points there). Where rows join (continuous batching), the rows at this bucket finish there,
        and only drafting here prefills them."""
        if not self.auto:
            return self.gamma
        self._draining = drains
        if self._probe_steps:
            return self._probe_steps.pop()
        costs = self._costs(batch_size)
        behind = self._drafter_behind(prefill_waits)
        recheck = None
        if costs.decided is not None and costs.decided[1] and costs.decided[2] and not behind:  # a choice to draft
            # made while the drafter was behind stands once drafting has caught it up: without the switch's cost
            # drafting only gains, and the best length does not depend on it (a switch adds the same cost to each
            # token whatever the length); made again, it cost a second decision at each row's start at batch 1
            costs.decided = (costs.decided[0], costs.decided[1], False)
        held = (costs.decided is not None and costs.steps < costs.next_probe and costs.decided[2] == behind
                and not self._after_prefill and (costs.steps - costs.decided[0] < REDECIDE or (
                    costs.decided[1] == 0 and costs.drafted_before == self._drafting_steps)))
        if not held and prefill_waits and drains and self._drains_into_drafting(batch_size, emitted):
            prefill_waits = False  # paid on the way down
        if held:
            best = costs.decided[1]
        elif len(costs.log_s) <= 1 and self._neighbour_decodes_plainly(costs.bucket):
            best = 0  # no exploring here either, but probes as any choice does
            self._made(costs, best, behind)
        elif 0 not in costs.log_s or (len(costs.log_s) == 1 and costs.timing_plain_first(0)):
            costs.plain_timings = PLAIN_TIMINGS if drains else 1
            return 0  # measure plain decoding first
        elif len(costs.log_s) == 1:
            return min(self.first_gamma, self.max_gamma)  # then a speculative step
        else:
            best, recheck = self._decide(batch_size, prefill_waits, emitted)
            self._made(costs, best, behind)
        if best not in costs.log_s:
            return best  # a neighbour that promises more: measure it
        if best != costs.last_best:  # the choice moved: watch more closely again
            costs.last_best, costs.probe_interval = best, self.probe_every
        if (costs.steps >= costs.next_probe or recheck is not None) and not self._after_prefill:  # keep the
            # neighbours' times fresh (a step after a prefill is not timed: a probe there would measure nothing)
            probe = self._probe(costs, batch_size, best, prefill_waits, emitted, recheck)
            if probe is not None:
                return probe
        return best

    def _made(self, costs: _BucketCosts, best: int, behind: bool) -> None:
        """The choice here is made now (the policy's drafting steps so far kept: a choice of plain decoding holds until
        one more)."""
        costs.decided, costs.drafted_before = (costs.steps, best, behind), self._drafting_steps

    def _probe(self, costs: _BucketCosts, batch_size: int, best: int, prefill_waits: bool,
               emitted: Sequence[int] | None, recheck: int | None = None) -> int | None:
        """The probe to make now, if one is affordable: probes may lose `exploration` of the steps at the bucket in
        all (what each is predicted to lose: _probe_loss), and one is made when what is left covers it; while plain
        decoding is the choice and drafting is predicted to gain g a step (not by enough to trust), `exploration` + g,
        since staying plain is predicted to lose g a step anyway, until the contender has a full set of timings
        (STEP_SAMPLES: more cannot shrink its standard error, and in a long job probes at 1% + g of the time would
        cost more than they could settle). Within 1% alone, a probe of drafting, paying a switch
        (the drafter's put-off prefill, a catch-up), waited for hundreds of steps: MSD at batch 8 on the demo world,
        drafting worth 1.16-1.25x plain decoding there, decoded plainly for 180 steps at its top bucket (two passes over
        the bench's rows) on one timing of drafting, and ran 0.85x its best fixed gamma. Candidates:
        while plain decoding is the choice, the draft length that came closest (its standard error is what holds
        drafting back); else plain decoding (the rate every choice must beat, kept fresh like the neighbours') and
        the choice's neighbours, in turn, a cheap one going first while a dear one waits (a neighbour's probe loses a
        tenth of a step where plain decoding's loses two: waiting behind it, the climb to a longer draft stalled). A k
        timed once is probed at no charge: its one timing may have been a stall (the VM's), and the choice, and the
        price of probing plain decoding again, rest on it (text-only at batch 32 on the demo world timed plain decoding
        once at 2x its cost there, and drafted at 0.80-0.85x plain decoding for six passes: a probe of plain decoding
        looked too dear to be made)."""
        unsettled_gain = 0.0  # what drafting is predicted to gain while more timings of it can settle that
        if best == 0:
            probe, gain, _ = self._contender(batch_size, prefill_waits, emitted)
            probe = probe if recheck is None else recheck
            candidates = [(probe, [probe] * (CONTENDER_STEPS if gain > 0 else 1))]
            if len(costs.relative.get(probe, ())) < STEP_SAMPLES:
                unsettled_gain = max(gain, 0.0)
        else:
            targets = sorted({0, best - 1, best + 1} & set(range(self.max_gamma + 1)) - {best})
            turn = costs.probe_turn % len(targets)
            candidates = [(k, [0] * SETTLE if k == 0 else []) for k in targets[turn:] + targets[:turn]]
        # each probe lasts until a step is timed: plain decoding after drafting SETTLE + 1 steps, drafting after plain
        # decoding one more (the first one catches up)
        share = self.exploration + unsettled_gain
        credit = share * costs.steps - costs.probe_losses
        losses = []
        for probe, rest in candidates:
            # timed once, its one timing may have been a stall: checked once for free
            once = costs.timed_once(probe)
            losses.append(0.0 if once else self._probe_loss(batch_size, best, probe, 1 + len(rest), prefill_waits))
            if losses[-1] <= credit:
                if once:  # (a probe whose steps were timed at another bucket, the rows having finished, is not again)
                    costs.checked.add(probe)
                self._probe_steps = rest
                costs.probe_losses += losses[-1]
                costs.probe_turn = (targets.index(probe) + 1) if best else costs.probe_turn + 1
                costs.next_probe = costs.steps + costs.probe_interval
                costs.probe_interval = min(2 * costs.probe_interval, self.max_probe_every)
                return probe
        costs.next_probe = costs.steps + math.ceil((min(losses) - credit) / share)
        return None

    def _probe_loss(self, batch_size: int, best: int, probe: int, steps: int, prefill_waits: bool) -> float:
        """What a probe of `steps` steps with k = probe instead of the choice is predicted to cost, in steps of the
        choice: the steps' lower rate, and a switch to drafting and back (the drafter's put-off prefill, catch-ups, and
        the SETTLE plain steps after drafting, which run slow: text-only at batch 1 on the demo world 1.17 and 1.12
        plain steps, where probes predicted to lose 1.2 steps each lost about 1.7). Probes are made while what they lose
        in all stays within `exploration` of the bucket's steps (see _probe). A probe of drafting in a static batch pays
        the drafter's prefill of the whole batch and a catch-up on what the rows emitted (text-only at batch 32 on the
        demo world: 2.2 and 0.5 ms, with two steps of one draft at 2.0x a plain step's 2.4 ms: 3.3 plain steps' time for
        3.2 rows' tokens), and probes every 16 to 64 steps there cost 5-8% of the time. Priced only after it (the next
        probe waiting on the last one's cost), each bucket's first probe came at its 16th step whatever it cost: MSD at
        batch 32 (its head's prefill of the batch 4.6 ms, two plain steps) lost 10% in the passes its buckets' first
        probes fell in."""
        rates = self._rates(sorted({best, probe}), batch_size, switch_per_token=0.0)  # the switch is counted below
        costs = self._costs(batch_size)
        best_s = self._step_seconds(costs, best)
        slower = steps * max(1.0 - rates[probe] / rates[best], 0.0) * self._step_seconds(costs, probe) / best_s
        switches = (probe == 0) != (best == 0)  # to drafting and back, or back and to drafting again
        switch = (self._switch_seconds(batch_size, prefill_waits and probe > 0, switches)
                  + (max(self._nearest_measured(batch_size, "settle_s"), 0.0) if switches else 0.0))
        return slower + switch / best_s

    def _neighbour_decodes_plainly(self, bucket: int) -> bool:
        """An adjacent bucket (twice or half the rows, the larger first) has measured drafting and chooses plain
        decoding: a bucket with no draft length measured yet then decodes plainly too, without exploring, until its
        probes time drafting there (a step's cost relative to plain decoding changes slowly with the batch size).

        A static batch drains through its small buckets in a few steps each (text-only at batch 32 on the demo world:
        1-3 steps a batch at 8-15 rows), too few to explore: each one measured plain decoding, then 3 drafts (the
        drafter's prefill of the whole batch, then a catch-up), on timings from one or two steps. Chosen with a replay
        of the demo world's measured acceptance (each row's greedy match lengths through the drafter) and step costs
        through this policy under a noise model of this VM (drift, 10% step-to-step spread, stalls), 16 seeds:
        text-only at batch 32 0.86x -> 0.92x plain decoding (its best fixed gamma 0.81x); with probes at most 64 steps
        apart (256 before) the worst of batch 1 and 8 against the best fixed gamma 0.96 -> 0.98."""
        for near in (bucket + 1, bucket - 1):
            if near in self.buckets and len(self.buckets[near].log_s) >= 2:
                return self.best_gamma(2 ** (near - 1)) == 0
        return False

    def best_gamma(self, batch_size: int, prefill_waits: bool = False, emitted: Sequence[int] | None = None) -> int:
        """The candidate k with the best predicted rate; 0 unless speculating beats plain decoding by the margin plus
        the standard error of the two step times compared: a step's time spreads around the machine's speed by what
        its steady steps measure (`step_spread`, log, this VM's, the prior: see PRIOR_RESIDUALS), and S(k) is the mean
        of at most STEP_SAMPLES, so with few samples (a bucket a static batch drains through in a few steps, or a k
        measured once) speculating must promise more. Without it, text-only at batch 32 on the demo world drafted in
        the batches' tails on one or two timings, where no gamma beats plain decoding (0.92x plain decoding, 0.94x with
        it, three bench runs each in turn; MSD there 0.88x and 0.92x). Candidates: the measured k and their
        neighbours."""
        return self._decide(batch_size, prefill_waits, emitted)[0]

    def _decide(self, batch_size: int, prefill_waits: bool, emitted: Sequence[int] | None) -> tuple[int, int | None]:
        """best_gamma, and the draft length to time again at once, for free, if any: while plain decoding is chosen
        by less than one timing's noise (the contender would pay with its step one standard error cheaper) and the
        contender's rate rests on a draft length timed once (the contender, or the measured one it is predicted from),
        whose one timing may have been a stall. Timed again only when the probes' budget allowed, that timing held for
        hundreds of steps: MSD at batch 8 on the demo world (3 drafts timed once at 2.8-3.2 plain steps, 4 predicted
        from it the contender; a static batch's drafter prefill priced each probe) decoded plainly at 8 rows through
        the timed passes in 10 of 16 fresh policies (`jobs/gamma_truth.py`), in 8 of 32 with this (step time 0.91 of
        the best fixed gamma's, 0.88 before; text-only at batch 32 0.98x plain decoding, 0.96x before)."""
        costs = self._costs(batch_size)
        contender, gain, standard_error = self._contender(batch_size, prefill_waits, emitted)
        if gain > self.margin + standard_error:
            return contender, None
        if gain > -(self.margin + standard_error) and self._drafts_above(costs):
            return contender, None
        step_s, plain_s = self._step_seconds(costs, contender), self._step_seconds(costs, 0)
        optimistic = (1.0 + gain) * step_s / max(step_s * math.exp(-standard_error), plain_s, 1e-9) - 1.0
        drafting = [k for k in costs.log_s if k > 0]
        if optimistic <= self.margin or not drafting:
            return 0, None
        rests_on = _nearest(drafting, contender)  # the contender itself where it is measured
        return 0, rests_on if costs.timed_once(rests_on) else None

    def _drafts_above(self, costs: _BucketCosts) -> bool:
        """The batch drains, its last step drafted, and the nearest larger bucket that has chosen chose to draft: then
        plain decoding is what must show that it wins here (see _decide), and the batch's draft length is a candidate
        (see _contender). MSD at a static batch of 8 on the demo world drafted at its top buckets and decoded plainly on
        most steps at 1-3 rows, where 5 drafts ran 1.23-1.51x plain decoding a step (its fixed engines' steps there):
        those buckets' first timings of drafting, one or two, fell under the bar, a probe came every few batches, and a
        bucket with no drafting timed copied its plain neighbour. Forced to 5 drafts at 1-3 rows it ran 0.948 of
        gamma 5 against 0.916 (eight fresh policies a side, wall time in turn with plain decoding and gamma 5). With
        this rule the replay (32 seeds) gains 0.3 to 1.0 points at batch 8 and is unchanged at 32; the engine's A/Bs
        against the code before (the same harness) moved MSD at batch 8 by -4.6 to +2.0 points a round, +0.1 pooled
        over 88 pairs of fresh policies (52 won), and batch 32 within their spread (docs/journal.md, the twenty-ninth
        session): the small buckets draft now, at the lengths their few timings choose."""
        if not (self._draining and self._last_k > 0):
            return False
        above = [b for b, other in self.buckets.items() if b > costs.bucket and other.decided is not None]
        return bool(above) and self.buckets[min(above)].decided[1] > 0

    def _contender(self, batch_size: int, prefill_waits: bool,
                   emitted: Sequence[int] | None) -> tuple[int, float, float]:
        """The candidate k > 0 with the best predicted rate, what it is predicted to gain over plain decoding (0.2:
        20% faster), and the standard error of the step times compared (see best_gamma). While plain decoding is the
        choice, probes time the contender, each probe shrinking the standard error that holds it back, until its mean
        says whether it pays. Probes of one draft instead (plain decoding's neighbour) could leave a contender timed
        once on a slow step held back for good, where one draft does not pay and more do (a drafting step's fixed
        costs: MSD's step with one draft took 1.8 plain steps at 4-7 rows on the demo world). Below a bucket that
        drafts, the batch's own draft length is a candidate too (see _drafts_above): a small bucket that has timed only
        one draft, MSD's dearest per token, would otherwise climb from there one length a decision. A length not timed
        is predicted from the nearest timed one, so where the batch drains its standard error is that one's (under
        continuous batching it counts as one timing, as before: see PLAIN_TIMINGS): counted as a single timing, the
        contender (most often the length just beyond those timed) had to promise about 0.2 on this VM, where MSD's
        drafting at a static batch of 8 on the demo world gains 0.15-0.25, and the choice there flipped between plain
        decoding and drafting as the contender moved."""
        costs = self._costs(batch_size)
        candidates = {c for k in costs.log_s or (0,) for c in (k - 1, k, k + 1) if 1 <= c <= self.max_gamma}
        if self._drafts_above(costs):
            candidates.add(self._last_k)
        if not candidates:
            return 0, 0.0, 0.0
        switch_per_token = self.switch_per_token(batch_size, prefill_waits, emitted)
        drain = None
        if self._draining and self.row_lengths.lengths:
            emitted_now = emitted or [0] * batch_size
            drain = self.row_lengths.mean_left(emitted_now), self.row_lengths.left_variance(emitted_now)
        rates = self._rates(sorted(candidates | {0}), batch_size, switch_per_token, costs, drain)
        plain = rates.pop(0)
        best = max(rates, key=rates.get)
        # (the choice, which probes are measured against, is read again at each of its steps: a full set)
        # a length not timed is predicted from the nearest timed one (where the batch drains: see PLAIN_TIMINGS; rows
        # joining, the timed lengths are not listed at all)
        rests_on = _nearest([k for k in costs.log_s if k > 0] or [best], best) if self._draining else best
        samples = [STEP_SAMPLES if costs.anchors(k) else max(len(costs.relative.get(k, ())), 1) for k in (0, rests_on)]
        spread = self._speed.spread(self.step_spread) if self.step_spread else 0.0
        return best, rates[best] / plain - 1.0, spread * math.sqrt(sum(1 / n for n in samples))

    def acceptance_per_position(self, batch_size: int | None = None, upto: int | None = None) -> list[float]:
        """a_i (for the first `upto` positions), measured where drafts reached position i, else the last measured
        position's (or the prior); at a batch size, measured at its bucket where drafts reached position i there
        BUCKET_REACHED times."""
        rates, last = [], self.prior_acceptance
        for reached, accepted in zip(self.reached[:upto], self.accepted[:upto]):
            last = accepted / reached if reached >= 1.0 else last
            rates.append(last)
        if batch_size is None:
            return rates
        costs = self._costs(batch_size)
        return [accepted / reached if reached >= BUCKET_REACHED else rate
                for reached, accepted, rate in zip(costs.reached, costs.accepted, rates)]

    def expected_tokens(self, k: int, batch_size: int | None = None) -> float:
        """E(k): tokens per step with k drafts."""
        return self._expected_tokens_upto(k, batch_size)[k]

    def _expected_tokens_upto(self, k: int, batch_size: int | None) -> list[float]:
        """[E(0), ..., E(k)]."""
        tokens, survive = [1.0], 1.0
        for rate in self.acceptance_per_position(batch_size, upto=k):
            survive *= min(rate, 0.999)
            tokens.append(tokens[-1] + survive)
        return tokens

    def expected_rate(self, k: int, batch_size: int, prefill_waits: bool = False,
                      emitted: Sequence[int] | None = None) -> float:
        """Predicted tokens per second per row with k drafts at this batch size; with what a switch to drafting costs
        spread over the rows' tokens left while the drafter is behind (once paid, it is paid)."""
        return self._rates([k], batch_size, self.switch_per_token(batch_size, prefill_waits, emitted))[k]

    def _rates(self, ks: list[int], batch_size: int, switch_per_token: float,
               costs: _BucketCosts | None = None, drain: tuple[float, float] | None = None) -> dict[int, float]:
        """expected_rate of each k (ks ascending) with a switch to drafting costing switch_per_token seconds a token,
        with one pass over the acceptance (each step decides); drain: where the batch drains, the tokens a row has left
        and their variance over the rows, with which drafting's rate counts its slowest row."""
        costs = costs or self._costs(batch_size)
        tokens = self._expected_tokens_upto(ks[-1], batch_size)
        rates = {k: tokens[k] / max(self._step_seconds(costs, k) + (tokens[k] * switch_per_token if k else 0.0), 1e-9)
                 for k in ks}
        if drain is not None and batch_size > 1:
            # the batch ends with its slowest row: plain decoding after max L_i steps, L_i a row's tokens left (mean L,
            # variance s2 over the rows), about L + z sqrt(s2), z = expected_maximum(rows). A row drafting emits X
            # tokens a step, E(k) on average (P(X > j) = E(j) - E(j-1), so E[X^2] = sum (2j+1) P(X > j)), so its steps
            # for L_i tokens spread by L Var X / E^3 more (a renewal count): in tokens, L Var X / E; so it ends after
            # about L + z sqrt(s2 + L Var X / E) tokens' worth of steps, the later ones with fewer rows
            left, variance = drain
            z, second_moment = expected_maximum(batch_size), 1.0
            plain_end = left + z * math.sqrt(variance)
            for j in range(1, ks[-1] + 1):
                second_moment += (2 * j + 1) * (tokens[j] - tokens[j - 1])
                if j in rates:
                    spread = max(second_moment - tokens[j] ** 2, 0.0) * left / tokens[j]
                    rates[j] /= 1.0 + STRAGGLER_STEP * ((left + z * math.sqrt(variance + spread)) / plain_end - 1.0)
        return rates

    def switch_per_token(self, batch_size: int, prefill_waits: bool, emitted: Sequence[int] | None = None) -> float:
        """Seconds a switch to drafting adds per token a row emits from now on: the drafter's put-off prefill of the
        batch when it waits and its catch-up when the last step decoded plainly, each as measured at this batch size,
        over the tokens a row has left (0 until a row has finished, or while drafting)."""
        seconds = self._switch_seconds(batch_size, prefill_waits, self._last_k == 0)
        left = self.row_lengths.mean_left(emitted if emitted is not None else [0] * batch_size) if seconds else None
        return seconds / left if left else 0.0

    def _drains_into_drafting(self, batch_size: int, emitted: Sequence[int] | None) -> bool:
        """The next smaller bucket has timed plain decoding and drafting, and would draft paying the drafter's prefill
        over these rows' tokens left. Judged with its drafter prefilled, as it was, neither bucket counted the prefill:
        in continuous batching's final drain (each `generate` call ends in one) MSD at batch 32 drafted at 16-31 rows
        with about 12 tokens a row left, paying its head's prefill of those rows (3.9-7.4 ms, 3-5 plain steps) and a
        catch-up, where the bucket below, charged the prefill, would decode plainly: 0.897x plain decoding, and 0.951x
        decoding plainly in the drains. Judged paying it (the code before and after as fresh policies in turn with plain
        decoding and gamma 6, 256 rows in calls of 128): 0.905 -> 0.933x and 0.915 -> 0.921x plain decoding (12 and 8
        a side, the new code winning 19 of 20); static batches: MSD at batch 8 0.925 -> 0.936 of gamma 5 (16 a side),
        MASSV 0.942 -> 0.937 (8), text-only at batch 32 0.986 -> 0.985x plain decoding (docs/journal.md, the
        twenty-ninth session). Judged again only once that bucket has stepped since, at the rows' tokens left then (a
        static batch's top bucket asks at each of its choices while the bucket below waits: judged every time, it took
        a third of `choose`'s time at text-only's batch 32)."""
        below = batch_bucket(batch_size) - 1
        costs = self.buckets.get(below)
        if costs is None or 0 not in costs.log_s or len(costs.log_s) < 2:
            return False
        if costs.would_draft is None or costs.would_draft[0] != costs.steps:
            costs.would_draft = costs.steps, self.best_gamma(2 ** (below - 1), prefill_waits=True, emitted=emitted) > 0
        return costs.would_draft[1]

    def _drafter_behind(self, prefill_waits: bool) -> bool:
        """A step that drafts now pays a switch: the drafter's prefill waits, or the last step decoded plainly."""
        return prefill_waits or self._last_k == 0

    def _switch_seconds(self, batch_size: int, prefill: bool, catch_up: bool) -> float:
        """What a switch to drafting costs at this batch size: the drafter's put-off prefill and/or its catch-up."""
        return ((self._nearest_measured(batch_size, "put_off_prefill_s") if prefill else 0.0)
                + (self._nearest_measured(batch_size, "catch_up_s") if catch_up else 0.0))

    def _nearest_measured(self, batch_size: int, cost: str) -> float:
        """A switch cost at this batch size's bucket, else at the nearest bucket that has measured it (the larger on a
        tie; both are mostly a call's fixed cost: text-only's prefill took 0.74 ms at 1 row, 2.2 ms at 32), else 0:
        a bucket measures them only when it switches, and the buckets a static batch drains through switch rarely."""
        costs = self._costs_of_size.get(batch_size)  # (read, not made: a question must not add a bucket)
        own = getattr(costs, cost) if costs is not None else None
        if own is not None:  # (the usual case, and the nearest: a decision asks twice, and a search cost 1 us each)
            return own
        bucket = batch_bucket(batch_size)
        measured = [b for b, costs in self.buckets.items() if getattr(costs, cost) is not None]
        if not measured:
            return 0.0
        return getattr(self.buckets[min(measured, key=lambda b: (abs(b - bucket), -b))], cost)

    def step_seconds(self, k: int, batch_size: int) -> float:
        """S(k): measured, or predicted from the nearest measured k (the lower one on a tie; for k > 0 the nearest
        measured with drafts, where one is, since a drafting step's fixed costs are in it) plus, per draft more
        (or less), one drafter forward and the verification's growth per token (never negative), and never below a
        measured shorter draft's. A measured S(k) is never below plain decoding's (a step that drafts does more
        work: timing noise must not say otherwise), but not floored by other drafts' (one unlucky measurement of a
        k no longer probed, a neighbour of a choice that has moved on, held every longer draft above it, and auto
        decoded plainly at 0.86x the best fixed gamma; plain decoding is probed whatever the choice)."""
        return self._step_seconds(self._costs(batch_size), k)

    def _step_seconds(self, costs: _BucketCosts, k: int) -> float:
        return costs.step_table(self.max_gamma)[k]

    def observe(self, k: int, num_accepted: list[int], step: StepTimes) -> None:
        """One step at batch size len(num_accepted): k drafts per row, of which row i kept num_accepted[i]."""
        if not self.auto:  # a fixed gamma reads none of it: skipped, MASSV at gamma 6 ran 1.4% faster at batch 1
            return
        costs = self._costs(len(num_accepted))
        costs.steps += 1
        self._steps += 1
        costs.verify_s[k + 1] = self._average(costs.verify_s.get(k + 1), step.besides_drafting_s)
        # after plain steps (or the drafter's put-off prefill), the drafter's catch-up reads many tokens: not what a
        # step with k drafts costs, but what a switch to drafting does; plain steps right after drafting ones run slow
        # (see SETTLE), and so do the step after a prefill (see observe_prefill) and the step after rows leave a static
        # batch (below)
        self._plain_run = self._plain_run + 1 if k == 0 else 0
        catching_up = k > 0 and (self._last_k == 0 or self._drafter_prefilled)
        # the first step after rows leave a draining batch runs slow too (text-only at a static batch of 8 on the demo
        # world: plain steps 7-15% over the next ones at the same rows, drafting ones 0-9%, about 0.05 ms each): timed
        # as a bucket's first plain step, it made drafting look cheaper in the small buckets, by 9-20% in
        # `jobs/gamma_truth.py`, and `auto` drafted at 4-7 rows on 52% of its steps where every gamma ran 0.91x plain
        # decoding or slower (13% once left untimed). Under continuous batching rows leave at almost every step: those
        # steps are what a step costs there, and are timed.
        batch_rows = len(num_accepted)
        shrank = self._draining and batch_rows < self._rows_before
        settled = not (self._after_prefill or shrank)
        if (self._plain_run > SETTLE if k == 0 else not catching_up) and settled:
            costs.observe_step(k, step.draft_s + step.besides_drafting_s, self._steps)
            if k > 0:
                costs.draft_s = self._average(costs.draft_s, step.draft_s / k)
        elif catching_up and costs.draft_s is not None:
            costs.catch_up_s = self._average(costs.catch_up_s, max(step.draft_s - k * costs.draft_s, 0.0))
        elif k == 0 and 0 in costs.log_s and settled:  # a plain step settling after drafting
            self._settling_s += step.draft_s + step.besides_drafting_s - math.exp(costs.speed.log + costs.log_s[0])
            if self._plain_run == SETTLE:
                costs.settle_s = self._average(costs.settle_s, self._settling_s)
        if k > 0:
            self._settling_s = 0.0
            self._drafting_steps += 1
            # only the positions this step drafted forget: a position beyond k keeps what it last measured (the
            # last measured position's rate stands in only for a position never measured, and acceptance falls
            # along a draft: letting a measured position fade into its predecessor's rate overrated longer drafts,
            # and auto kept trying them)
            accepted_rows = {}  # rows per accepted count, in first-seen order (a Counter cost 10x as much at 1 row)
            for n in num_accepted:
                accepted_rows[n] = accepted_rows.get(n, 0) + 1
            memory = self.memory
            for reached, accepted in ((self.reached, self.accepted), (costs.reached, costs.accepted)):
                reached[:k] = [r * memory for r in reached[:k]]
                accepted[:k] = [a * memory for a in accepted[:k]]
                for n, rows in accepted_rows.items():
                    for i in range(min(n + 1, k)):
                        reached[i] += rows
                    for i in range(n):
                        accepted[i] += rows
        self._last_k, self._rows_before = k, batch_rows
        self._after_prefill = self._drafter_prefilled = False

    def observe_drafter_prefill(self, batch_size: int, rows: int, seconds: float) -> None:
        """The drafter's put-off prefill of `rows` rows, before a step at this batch size, took `seconds`."""
        costs = self._costs(batch_size)
        costs.put_off_prefill_s = self._average(costs.put_off_prefill_s, seconds)
        self._drafter_prefilled = True

    def observe_finished(self, lengths: list[int]) -> None:
        """Rows finished with these numbers of tokens."""
        self.row_lengths.observe(lengths)

    def observe_prefill(self) -> None:
        """Rows were prefilled: the next step is not timed. The first step after a prefill ran 15% slower than the
        next ones (plain decoding, batch 32, demo world: median 3.06 ms against 2.4-2.7), the first of a run over
        twice as slow; in a static batch of 32 that step is the first one at its bucket, so it was often the first or
        only plain step measured there, and auto, rating plain decoding too slow, drafted at 0.83x plain decoding."""
        self._after_prefill = True

    def _costs(self, batch_size: int) -> _BucketCosts:
        costs = self._costs_of_size.get(batch_size)  # (every call of a step reads it: a bucket's costs by batch size)
        if costs is None:
            bucket = batch_bucket(batch_size)
            if bucket not in self.buckets:
                self.buckets[bucket] = _BucketCosts(self._speed, bucket, probe_interval=self.probe_every,
                                                    next_probe=self.probe_every, reached=[0.0] * self.max_gamma,
                                                    accepted=[0.0] * self.max_gamma)
            costs = self._costs_of_size[batch_size] = self.buckets[bucket]
        return costs

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new
