"""gamma: parsing, and `auto` choosing from measured acceptance and costs."""

import math
import re

import pytest

from pipeline.engine.gamma import (
    ANCHOR_SAMPLES,
    AUTO,
    CONTENDER_STEPS,
    FIRST_GAMMA,
    PLAIN_TIMINGS,
    SETTLE,
    STEP_SAMPLES,
    STRAGGLER_STEP,
    GammaPolicy,
    RowLengths,
    batch_bucket,
    parse_gamma,
)
from pipeline.engine.stats import StepTimes


def test_parse_gamma():
    assert parse_gamma("auto") == AUTO and parse_gamma(" AUTO ") == AUTO
    assert parse_gamma("4") == 4 and parse_gamma(0) == 0
    for bad in ["-1", "x", None, 2.5j]:
        with pytest.raises(ValueError, match="gamma must be"):
            parse_gamma(bad)


def set_acceptance(policy: GammaPolicy, rates: list[float]) -> None:
    """Acceptance per position as if long measured at `rates`: overall and at every bucket measured so far."""
    for counts in (policy, *policy.buckets.values()):
        counts.reached, counts.accepted = [100.0] * len(rates), [100.0 * rate for rate in rates]


def observe_plain(policy: GammaPolicy, batch_size: int, seconds: float) -> None:
    """Plain steps until one is timed (the first SETTLE plain steps after drafting ones, or at the start, are not)."""
    for _ in range(SETTLE + 1):
        policy.observe(0, [0] * batch_size, StepTimes(0.0, seconds))


def observe_drafting(policy: GammaPolicy, batch_size: int, k: int, draft_s: float, step_s: float) -> None:
    """Steps of k drafts, each row keeping all, until one is timed (the first after plain steps catches up)."""
    for _ in range(2):
        policy.observe(k, [k] * batch_size, StepTimes(draft_s, step_s - draft_s))


def policy_after(acceptance, draft_s, verify_s, batch_size=1):
    """A policy that has measured plain decoding and two speculative steps of 4 drafts a row."""
    policy = GammaPolicy(gamma="auto", max_gamma=8)
    observe_plain(policy, batch_size, verify_s(1))
    for _ in range(2):
        policy.observe(4, [round(4 * acceptance)] * batch_size, StepTimes(draft_s * 4, verify_s(5)))
    set_acceptance(policy, [acceptance] * 8)
    return policy


def test_auto_speculates_when_drafts_are_cheap_and_good():
    policy = policy_after(0.8, draft_s=0.01, verify_s=lambda q: 1.0)  # memory-bound target
    assert policy.best_gamma(1) >= 4
    assert policy.expected_rate(policy.best_gamma(1), 1) > 2 * policy.expected_rate(0, 1)


def test_auto_falls_to_zero_when_verification_grows_with_width():
    policy = policy_after(0.5, draft_s=0.05, verify_s=lambda q: 1.0 * q)  # compute-bound (large batch)
    assert policy.best_gamma(1) == 0


def test_auto_falls_to_zero_with_a_useless_drafter():
    policy = policy_after(0.0, draft_s=0.01, verify_s=lambda q: 1.0)
    assert policy.best_gamma(1) == 0
    # Even when noise makes a wider verification look faster than a plain step.
    noisy = policy_after(0.0, draft_s=0.001, verify_s=lambda q: 1.0 if q == 1 else 0.9)
    assert noisy.best_gamma(1) == 0


def test_auto_does_not_speculate_for_a_marginal_gain():
    # 1 draft at 0.5 acceptance: 1.5 tokens for 1.47 plain steps' time, a 2% gain: below the 3% margin
    policy = policy_after(0.5, draft_s=0.47, verify_s=lambda q: 1.0)
    policy.step_spread = 0.0  # step times exact
    assert policy.expected_rate(1, 1) > policy.expected_rate(0, 1) and policy.best_gamma(1) == 0
    policy.margin = 0.0
    assert policy.best_gamma(1) > 0


def test_auto_asks_more_of_speculation_measured_on_few_steps():
    """1 draft at 0.8 acceptance: 1.8 tokens for 1.5 plain steps' time, 20% more than plain decoding. Timed on one step
    each, at 15% spread a step, that is within the noise (3% + 21%); timed on six each, it is not (3% + 9%)."""
    policy = GammaPolicy(gamma="auto", max_gamma=1)
    observe_plain(policy, 1, 1.0)
    for _ in range(2):  # the first step with drafts after plain ones catches up: not timed
        policy.observe(1, [1], StepTimes(0.5, 1.0))
    set_acceptance(policy, [0.8])
    assert policy.expected_rate(1, 1) / policy.expected_rate(0, 1) == pytest.approx(1.2)
    assert policy.best_gamma(1) == 0
    for _ in range(5):  # each a change of k, timed against the speed just before
        observe_plain(policy, 1, 1.0)
        for _ in range(2):
            policy.observe(1, [1], StepTimes(0.5, 1.0))
    assert policy.best_gamma(1) == 1


def test_measured_step_times_decide_not_the_model():
    """Steps with 4 drafts measured, beside plain steps, at 3 plain steps' time (costs the drafter's per-forward time
    does not show): the measurement counts, and the choice falls to plain decoding."""
    policy = policy_after(0.5, draft_s=0.05, verify_s=lambda q: 1.0)
    assert policy.best_gamma(1) > 0
    for _ in range(10):  # the first step with drafts after plain ones catches up: not timed
        for _ in range(2):
            policy.observe(4, [2], StepTimes(draft_s=0.2, verify_s=2.8))
        observe_plain(policy, 1, 1.0)
    set_acceptance(policy, [0.5] * 8)  # the acceptance as before
    assert policy.step_seconds(4, 1) / policy.step_seconds(0, 1) == pytest.approx(3.0, rel=0.1)
    assert policy.best_gamma(1) == 0


def test_one_unlucky_measurement_does_not_hold_longer_drafts_back():
    """A k measured once at a bad moment, and not probed again once the choice moved past it, must not floor the
    costs of the longer drafts measured since."""
    policy = policy_after(0.8, draft_s=0.01, verify_s=lambda q: 1.0)
    policy.observe(2, [1], StepTimes(0.02, 3.0))  # 2 drafts, once, at three plain steps' time
    policy.observe(4, [3], StepTimes(0.04, 1.0))
    set_acceptance(policy, [0.8] * 8)
    assert policy.step_seconds(2, 1) > 2.5 and policy.step_seconds(4, 1) < 1.1 and policy.best_gamma(1) >= 4


def test_a_machine_that_slows_down_does_not_change_the_choice():
    """Steps are compared with steps close in time: plain decoding measured while the machine was fast must not be
    set against speculative steps measured since it slowed down (a VM's speed drifts by tens of percent)."""
    policy = GammaPolicy(gamma="auto", max_gamma=4, probe_every=4)
    choices = []
    for i in range(400):
        slowdown = 1.0 + i / 400  # slower and slower: at the end it runs at half the speed
        set_acceptance(policy, [0.4] * 4)
        k = policy.choose(1)
        choices.append(k)
        policy.observe(k, [k // 2], StepTimes(0.1 * k * slowdown, 1.0 * slowdown))
    # 2 drafts: 1.56 tokens for 1.2 plain steps' time, 1.30x plain decoding (1 draft 1.27x, 3 1.25x, 4 1.18x)
    assert choices[20:].count(2) >= 0.9 * 380  # the least of each k's last steps, used before: 56%
    assert policy.step_seconds(2, 1) / policy.step_seconds(0, 1) == pytest.approx(1.2, rel=0.05)


def test_acceptance_is_counted_per_position_and_falling_acceptance_shortens_drafts():
    policy = GammaPolicy(gamma="auto", max_gamma=4, memory=1.0)
    policy.observe(3, [3, 1, 0, 0], StepTimes(draft_s=0.0, verify_s=1.0))  # four rows, three drafts each
    # position 1: 4 reached, 2 accepted; position 2: 2 reached (rows 0, 1), 1 accepted; position 3: 1 of 1.
    assert policy.acceptance_per_position() == [0.5, 0.5, 1.0, 1.0]  # position 4 not reached: the last one's
    assert policy.expected_tokens(2) == 1 + 0.5 + 0.25

    falling = GammaPolicy(gamma="auto", max_gamma=8)
    choices = []
    for _ in range(60):  # flat verification, drafter forwards at 1/10 of a target step
        set_acceptance(falling, [0.9, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
        k = falling.choose(1)
        choices.append(k)
        falling.observe(k, [0], StepTimes(0.1 * k, 1.0))
    set_acceptance(falling, [0.9, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert falling.best_gamma(1) == 2  # one average rate (0.26) would say 0; a flat 0.9 would say 8
    assert choices[:3] == [0, 3, 3] and choices[-10:].count(2) >= 8  # it climbed down from 3 and stays


def test_costs_are_kept_per_batch_size_bucket():
    policy = GammaPolicy(gamma="auto")
    for k, verify_s in ((0, 1.0), (4, 1.05), (4, 1.05)):  # batch 32: verifying 5 tokens costs what 1 does
        policy.observe(k, [0] * 32, StepTimes(0.05 * k, verify_s))
    for k, verify_s in ((0, 1.0), (4, 5.0), (4, 5.0)):  # batch 2: 5 tokens cost 5 times 1
        policy.observe(k, [0] * 2, StepTimes(0.05 * k, verify_s))
    set_acceptance(policy, [0.7] * 8)
    assert policy.best_gamma(32) >= 3 and policy.best_gamma(40) == policy.best_gamma(32)
    assert policy.best_gamma(2) == 0 and policy.best_gamma(3) == 0
    assert policy.choose(5) == 0  # a new bucket is measured from scratch: plain decoding first


def test_acceptance_is_kept_per_bucket_too():
    """In a static batch a bucket is a stretch of the answers, and acceptance grows along an answer: a bucket's own
    acceptance decides there, the overall one only where the bucket has not measured a position."""
    policy = GammaPolicy(gamma="auto", max_gamma=4, memory=1.0)
    for _ in range(20):
        policy.observe(2, [0] * 32, StepTimes(0.2, 1.0))  # 32 rows: every first draft rejected
        policy.observe(2, [2], StepTimes(0.2, 1.0))  # 1 row: both accepted
    assert policy.acceptance_per_position(32) == [0.0] + policy.acceptance_per_position()[1:]
    assert policy.acceptance_per_position(1) == [1.0, 1.0, 1.0, 1.0]  # positions 3, 4 not measured: position 2's
    assert policy.acceptance_per_position()[:2] == [20 / 660, 1.0]
    assert policy.expected_tokens(2, 32) == 1.0 and policy.expected_tokens(2, 1) == pytest.approx(3.0, rel=0.01)


def test_a_catch_up_after_plain_steps_is_not_taken_as_the_drafting_cost():
    policy = GammaPolicy(gamma="auto")
    policy.observe(0, [0], StepTimes(0.0, 1.0))
    policy.observe(4, [2], StepTimes(4.0, 1.0))  # catch-up after plain steps: 1.0 s a draft forward, not typical
    assert policy.buckets[1].draft_s is None
    policy.observe(4, [2], StepTimes(0.4, 1.0))
    assert policy.buckets[1].draft_s == 0.1


def test_the_step_after_a_prefill_is_not_timed():
    policy = GammaPolicy(gamma="auto")
    policy.observe_prefill()
    policy.observe(0, [0], StepTimes(0.0, 5.0))  # the first step after a prefill runs slow: not plain decoding's cost
    assert policy.choose(1) == 0  # plain decoding is still to be measured
    policy.observe(0, [0], StepTimes(0.0, 1.0))
    assert policy.step_seconds(0, 1) == pytest.approx(1.0)
    policy.observe_prefill()
    policy.observe(3, [3], StepTimes(0.3, 1.0))  # not timed, but its drafts count
    assert policy.buckets[1].reached[:3] == [1.0, 1.0, 1.0] and 3 not in policy.buckets[1].log_s


def test_the_step_after_rows_leave_a_draining_batch_is_not_timed():
    """Rows leaving a static batch slow its next step (text-only at batch 8 on the demo world: plain steps 7-15%):
    timed, it raised the bucket's plain decoding and drafting looked cheaper there. Under continuous batching rows
    leave at almost every step, and such a step is what a step costs: it is timed."""
    for drains, timed in ((True, False), (False, True)):
        policy = GammaPolicy(gamma="auto")
        policy.choose(6, drains=drains)
        policy.observe(0, [0] * 6, StepTimes(0.0, 1.0))  # the first timed step: plain decoding at 4-7 rows
        policy.choose(5, drains=drains)
        policy.observe(0, [0] * 5, StepTimes(0.0, 2.0))  # a row has left
        assert (policy.step_seconds(0, 5) > 1.0) == timed
        policy.choose(5, drains=drains)
        policy.observe(0, [0] * 5, StepTimes(0.0, 1.0))  # the same rows again: timed either way
        assert policy.buckets[3].speed.last_timed[0] == 3


def test_auto_starts_by_measuring_both_regimes_climbs_then_probes():
    policy = GammaPolicy(gamma="auto", max_gamma=6, probe_every=4, exploration=0.01)  # the budget the spacings assume
    choices = []
    for _ in range(1500):  # every draft accepted, each costing a hundredth of a step: longer drafts always pay
        set_acceptance(policy, [1.0] * 6)
        k = policy.choose(1)
        choices.append(k)
        policy.observe(k, [k], StepTimes(0.01 * k, 1.0))
    # plain first, then 3 twice (the first one catches up after plain steps), then one draft more at a time
    assert choices[:6] == [0, 3, 3, 4, 5, 6]
    probes = [i for i, k in enumerate(choices) if i > 5 and k != 6 and choices[i - 1] == 6]
    # plain decoding (SETTLE + 1 steps, only the last one timed) and the one neighbour
    assert {tuple(choices[i:i + SETTLE + 1]) for i in probes} == {(0,) * (SETTLE + 1), (5, 6, 6)}
    # Probes may lose 1% of the steps in all, but a k timed once (a stall, perhaps) is probed for free: plain decoding
    # and the neighbour first. Then one of the neighbour (6 tokens a step instead of 7 for the same time) loses 0.13 of
    # a step, and comes as the intervals double, to 64; one of plain decoding (3 steps at a seventh of the rate) loses
    # 2.4 steps: it waits, the cheaper probes going first, until what they left covers it (at step 258, 2.58 - 5 x
    # 0.13 = 1.91 steps; at 322, 2.42).
    neighbour = [i for i in probes if choices[i] == 5]
    plain = [i for i in probes if choices[i] == 0]
    assert probes[0] == plain[0] < probes[1] == neighbour[0]
    assert [b - a for a, b in zip(neighbour, neighbour[1:])][:6] == [8, 16, 32, 64, 64, 64]
    assert plain[1] == 322 and len(plain) == 6
    assert policy.buckets[1].probe_losses <= policy.exploration * len(choices)


def drafting_measured_at_32_rows(draft_s: float) -> GammaPolicy:
    """A policy that has measured plain decoding (1 s a step) and 3 drafts (draft_s + 1 s) at 32 rows."""
    policy = GammaPolicy(gamma="auto", max_gamma=8, probe_every=4)
    observe_plain(policy, 32, 1.0)
    for _ in range(2):
        policy.observe(3, [1] * 32, StepTimes(draft_s, 1.0))
    observe_plain(policy, 32, 1.0)
    set_acceptance(policy, [0.5] * 8)
    return policy


def choices_at(policy: GammaPolicy, batch_size: int, steps: int) -> list[int]:
    """What auto chooses at this batch size, step by step (a draft costs 0.1 s, acceptance 0.5)."""
    choices = []
    for _ in range(steps):
        set_acceptance(policy, [0.5] * 8)
        k = policy.choose(batch_size)
        choices.append(k)
        policy.observe(k, [0] * batch_size, StepTimes(0.1 * k, 1.0))
    return choices


def test_a_bucket_next_to_one_that_decodes_plainly_decodes_plainly_until_its_probes():
    """A static batch drains through its small buckets in a few steps each, too few to explore (plain decoding, then 3
    drafts: the drafter's prefill of the batch, a catch-up, on one or two timings). A bucket next to one that has
    measured drafting and decodes plainly decodes plainly too, and probes as any choice does; where its probe finds that
    drafting pays, it drafts. Next to a bucket that drafts, a bucket explores as the first one did."""
    plain_next_door = drafting_measured_at_32_rows(draft_s=3.0)  # 3 drafts cost 4 plain steps at 32 rows
    assert plain_next_door.best_gamma(32) == 0
    choices = choices_at(plain_next_door, 20, 12)
    assert choices[:6] == [0, 0, 0, 0, 1, 1] and choices[-1] > 0  # 1 draft at 1.1 steps' time: 1.5 tokens

    drafting_next_door = drafting_measured_at_32_rows(draft_s=0.3)
    assert drafting_next_door.best_gamma(32) > 0
    assert choices_at(drafting_next_door, 20, 3)[:2] == [0, 3]


def test_engine_config_fails_at_once_on_bad_values():
    from pipeline.engine.engine import EngineConfig

    assert EngineConfig(gamma="Auto").gamma == AUTO and EngineConfig(gamma="2").gamma == 2
    with pytest.raises(ValueError, match="gamma must be"):
        EngineConfig(gamma="three")
    with pytest.raises(ValueError, match="max_new_tokens"):
        EngineConfig(max_new_tokens=-1)


def test_fixed_gamma_is_fixed():
    assert GammaPolicy(gamma=3).choose(8) == 3


def test_the_drafters_put_off_prefill_counts_against_drafting():
    """A step with 1 draft at 0.6 acceptance: 1.6 tokens for 1.4 plain steps' time, 1.14x plain decoding a step. But
    the drafter's put-off prefill costs 3 plain steps a row, and rows are 10 tokens long: drafting a row costs 0.3
    plain steps a token more, and plain decoding is faster, until the prefill is paid."""
    policy = policy_after(0.6, draft_s=0.4, verify_s=lambda q: 1.0)
    policy.observe(1, [1], StepTimes(0.4, 1.0))
    set_acceptance(policy, [0.6] * 8)
    policy.step_spread = 0.0  # step times exact
    assert policy.best_gamma(1, prefill_waits=True) == 1
    policy.observe_drafter_prefill(batch_size=1, rows=1, seconds=3.0)
    assert policy.best_gamma(1, prefill_waits=True) == 1  # no row has finished: how long rows are is not known yet
    policy.observe_finished([10, 10])
    assert policy.switch_per_token(1, prefill_waits=True) == pytest.approx(0.3)  # rows at their start: 10 tokens left
    assert policy.expected_rate(1, 1, prefill_waits=True) == pytest.approx(1.6 / (1.4 + 1.6 * 0.3))
    assert policy.best_gamma(1, prefill_waits=True) == 0
    assert policy.best_gamma(1) == 1  # once paid (the rows are prefilled), it is paid: drafting pays
    # a row with 8 of its 10 tokens emitted has 2 left to spread it over
    assert policy.switch_per_token(1, prefill_waits=True, emitted=[8]) == pytest.approx(1.5)
    # a bucket that has not measured the prefill takes the nearest one's (a call's cost, mostly)
    assert policy.switch_per_token(8, prefill_waits=True) == pytest.approx(0.3)


def test_a_static_batch_draining_into_a_bucket_that_drafts_pays_the_prefill_there_anyway():
    """As above (1 draft 1.14x plain decoding a step at 8 rows, the drafter's prefill 0.3 plain steps a token). Where
    4-7 rows would draft too, even paying the drafter's prefill over the rows' tokens left (1 draft there at 1.0 plain
    steps: 1.6 tokens for 1.0 + 1.6 * 0.3), a static batch of 8 (it drains: no row joins) pays the prefill on its way
    down whatever its top bucket does: there the prefill is not drafting's cost, and drafting pays from the start.
    Where 4-7 rows would draft only with their drafter prefilled (1 draft at 1.4 plain steps), judged so, neither
    bucket counted the prefill; where they would decode plainly, or rows join the batch (continuous batching: its rows
    finish at 8), drafting at 8 rows is what pays the prefill."""
    for draft_step_at_4, drains, drafts in ((1.0, True, 1), (1.4, True, 0), (2.0, True, 0), (1.0, False, 0)):
        policy = GammaPolicy(gamma="auto", max_gamma=8)
        for rows, draft_step in ((8, 1.4), (4, draft_step_at_4)):
            observe_plain(policy, rows, 1.0)
            observe_drafting(policy, rows, 1, 0.4, draft_step)
        set_acceptance(policy, [0.6] * 8)
        policy.step_spread = 0.0  # step times exact
        policy.observe_drafter_prefill(batch_size=8, rows=8, seconds=3.0)
        policy.observe_finished([5, 15])  # 10 tokens a row: the prefill 0.3 plain steps a token (lengths that
        # differ: the slowest row ends about when it would decoding plainly, see the next test)
        assert policy.best_gamma(4) == (draft_step_at_4 < 2.0)
        assert policy.best_gamma(4, prefill_waits=True) == (draft_step_at_4 < 1.4)
        assert policy.best_gamma(8, prefill_waits=True) == 0  # the prefill counted
        assert policy.choose(8, prefill_waits=True, drains=drains) == drafts


def test_in_a_draining_batch_drafting_is_rated_by_its_slowest_row():
    """1 draft at 0.6 acceptance: 1.6 tokens a step for 1.4 plain steps' time, 1.14x plain decoding a step. Rows that
    join as others finish (continuous batching) take that. A static batch's drain steps until its slowest row is done,
    and drafting spreads how many steps a row takes (its tokens a step vary: variance 0.24). 4 rows of 44 tokens with 4
    left each: plain decoding ends them after 4 steps, drafting after the slowest row's, on average 1.049 spreads
    (expected_maximum(4)) more than 4 / 1.6 steps, a relative spread of sqrt(0.24 / (1.6 * 4)) = 0.19, in steps that
    cost 0.7 of the batch's (STRAGGLER_STEP): 1.14 / 1.14, not the margin more than plain decoding drafting must
    promise. With 40 tokens left the spread is a third of that, and drafting pays; so it does where the rows' lengths
    differ (41-47): plain decoding's end is about as uncertain then."""
    def fresh_policy(lengths: list[int]) -> GammaPolicy:
        policy = GammaPolicy(gamma="auto", max_gamma=1)
        observe_plain(policy, 4, 1.0)
        for _ in range(2):  # the first catches up: not timed
            policy.observe(1, [1] * 4, StepTimes(0.4, 1.0))
        set_acceptance(policy, [0.6])
        policy.step_spread = 0.0  # step times exact
        policy.observe_finished(lengths)
        return policy

    same = [44, 44]
    assert fresh_policy(same).choose(4, emitted=[40] * 4, drains=False) == 1  # 4 tokens left
    assert fresh_policy(same).choose(4, emitted=[40] * 4, drains=True) == 0
    assert fresh_policy(same).choose(4, emitted=[4] * 4, drains=True) == 1  # 40 left
    assert fresh_policy([41, 42, 46, 47]).choose(4, emitted=[40] * 4, drains=True) == 1  # 4 left on average
    assert fresh_policy(same)._rates([0, 1], 4, 0.0, drain=(4.0, 0.0))[1] == pytest.approx(
        1.6 / 1.4 / (1 + STRAGGLER_STEP * 1.049 * math.sqrt(0.24 / (1.6 * 4))), rel=1e-3)


def test_a_switch_to_drafting_costs_the_drafters_catch_up_too():
    """The first drafting step after plain ones catches the drafter up on what the rows emitted meanwhile: what it
    adds to drafting is measured, not timed as the cost of k drafts, and counts against a switch."""
    policy = policy_after(0.6, draft_s=0.1, verify_s=lambda q: 1.0)
    observe_plain(policy, 1, 1.0)
    policy.observe(1, [1], StepTimes(0.9, 1.0))  # catching up: 0.8 s more than a draft
    assert policy.buckets[1].catch_up_s == pytest.approx(0.8)
    assert policy.step_seconds(1, 1) == pytest.approx(1.1)  # not timed as 1 draft's cost
    policy.observe_finished([8])
    observe_plain(policy, 1, 1.0)
    assert policy.switch_per_token(1, prefill_waits=False, emitted=[4]) == pytest.approx(0.2)  # 0.8 s over 4 tokens
    policy.observe(1, [1], StepTimes(0.1, 1.0))  # drafting again: the drafter is not behind
    assert policy.switch_per_token(1, prefill_waits=False, emitted=[4]) == 0.0


def test_the_lengths_of_finished_rows_say_how_many_tokens_a_row_has_left():
    lengths = RowLengths()
    assert lengths.mean_left([0]) is None
    lengths.observe([10, 20, 30])
    assert lengths.mean_left([0]) == pytest.approx(20)
    assert lengths.mean_left([15]) == pytest.approx(10)  # rows of 20 and 30: 5 or 15 left
    assert lengths.mean_left([25]) == pytest.approx(5)
    assert lengths.mean_left([30]) == lengths.mean_left([99]) == 1.0  # longer than any row seen: about to end
    assert lengths.mean_left([0, 25]) == pytest.approx(12.5)
    few = RowLengths(kept=3)  # the latest kept: the oldest go as new ones come
    few.observe([10, 20])
    few.observe([30, 40, 20])
    assert list(few.lengths) == [30, 40, 20] and few.counts == {20: 1, 30: 1, 40: 1}
    assert few.mean_left([15]) == pytest.approx(15)  # rows of 20, 30 and 40: 5, 15 or 25 left
    assert few.left_variance([15]) == pytest.approx(200 / 3) and few.left_variance([35]) == 0.0


def test_plain_steps_right_after_drafting_ones_are_not_timed():
    """They run slower than plain steps after plain ones: taken as plain decoding's cost, they made it look slower than
    it is whenever drafting was the choice. A probe of plain decoding lasts until a plain step is timed."""
    policy = GammaPolicy(gamma="auto", max_gamma=4, probe_every=4)
    choices = []
    for _ in range(400):  # a probe of plain decoding loses about 2 steps here: one every 200 steps or more
        set_acceptance(policy, [0.9] * 4)
        k = policy.choose(1)
        choices.append(k)
        slow = k == 0 and any(choices[-SETTLE - 1:-1])  # a plain step at most SETTLE steps after a drafting one
        policy.observe(k, [k], StepTimes(0.1 * k, 1.5 if slow else 1.0))
    runs = "".join("p" if k == 0 else "d" for k in choices[3:])
    assert "p" * (SETTLE + 1) in runs and "dpd" not in runs  # plain probes of SETTLE + 1 steps
    assert policy.step_seconds(0, 1) == pytest.approx(1.0)


def test_fewer_drafts_than_measured_save_at_most_what_drafting_adds_per_draft():
    """A draft length below the measured ones is predicted by taking off, per draft, a drafter forward and the
    verification's growth per token: averages over steps at other moments, and noisy (text-only at batch 32 on the
    demo world predicted one draft at 1.0 plain steps from three timed at 2.8, and timed it at 1.9). A draft saves at
    most its share of what drafting adds to a plain step; the rest is a drafting step's fixed cost."""
    policy = policy_after(0.5, draft_s=0.1, verify_s=lambda q: 1.0 if q == 1 else 1.4)  # S(4) 1.8, fixed cost 0.4
    policy.observe(0, [0], StepTimes(0.0, 1.0))
    policy.observe(5, [2], StepTimes(0.5, 3.0))  # catching up, not timed: one wide verification that ran slow
    assert policy.buckets[1].verify_growth(to_plain=False) == pytest.approx(1.6)
    assert policy.step_seconds(1, 1) == pytest.approx(1.8 - 3 * (1.8 - 1.0) / 4)


def test_a_probe_of_drafting_from_plain_decoding_lasts_until_it_is_timed():
    """The first drafting step after plain ones catches up (not timed): a probe of drafting drafts once more than it
    times, so a choice of plain decoding learns what drafting costs now; it times CONTENDER_STEPS steps while drafting
    is predicted to gain (only the switch costs then), one once it is predicted to lose."""
    policy = policy_after(0.2, draft_s=0.1, verify_s=lambda q: 1.0, batch_size=1)  # one draft: 9% gain predicted
    choices = []
    for _ in range(600):  # probes predicted to lose a step each, at most `exploration` (0.5%) of the steps
        set_acceptance(policy, [0.2] * 8)
        k = policy.choose(1)
        choices.append(k)
        policy.observe(k, [0], StepTimes(0.1 * k, 1.0 if k == 0 else 2.0))  # drafting got slower: 2 plain steps
    probes = re.findall("d+", "".join("p" if k == 0 else "d" for k in choices))
    assert probes[0] == "d" * (CONTENDER_STEPS + 1) and probes[1:] and set(probes[1:]) == {"dd"}
    assert policy.step_seconds(1, 1) == pytest.approx(2.1, rel=1e-4)  # measured (plain decoding's neighbour probed)


def test_a_draft_length_timed_once_is_probed_for_free_once():
    """Its one timing may have been a stall, so its first probe costs nothing from the probes' budget; only the first:
    a probe whose steps were timed at another bucket (rows finished meanwhile) leaves it timed once here, and probing
    it for free again and again cost what the budget is there to bound."""
    policy = GammaPolicy(gamma="auto", max_gamma=8, probe_every=4)
    observe_plain(policy, 32, 1.0)
    for _ in range(2):  # the first catches up: 3 drafts timed once, a drafting step's fixed costs making it 4.1 s
        policy.observe(3, [3] * 32, StepTimes(0.6, 3.5))
    observe_plain(policy, 32, 1.0)
    acceptance = [0.9, 0.9, 0.9] + [0.1] * 5
    choices = []
    for _ in range(300):
        set_acceptance(policy, acceptance)
        choices.append(policy.choose(32))
        k, rows = choices[-1], 31 if choices[-1] else 32  # drafting steps land at 16-31 rows
        policy.observe(k, [min(k, 3)] * rows, StepTimes(0.2 * k, 3.5 if k else 1.0))
    assert policy.best_gamma(32) == 0 and policy._contender(32, False, None)[0] == 3
    assert len(policy.buckets[6].relative[3]) == 1
    probes = [m.start() for m in re.finditer("d+", "".join("p" if k == 0 else "d" for k in choices))]
    # for free at once; then each loses 1.3 steps (2 steps at 0.84 of plain decoding's rate, each 4.1 plain steps)
    assert probes[0] == 0 and min(b - a for a, b in zip(probes, probes[1:])) > 100


def test_a_choice_holds_a_few_steps_unless_the_drafter_falls_behind():
    """Choosing costs tens of microseconds a step: a bucket's choice is made again every REDECIDE steps, or at once
    when the last step decoded plainly where it drafted before (the drafter fell behind: a switch back costs)."""
    from pipeline.engine.gamma import REDECIDE

    policy = policy_after(0.8, draft_s=0.01, verify_s=lambda q: 1.0)
    policy.probe_every = policy.max_probe_every = 1000  # no probes here
    for costs in policy.buckets.values():
        costs.next_probe = 1000
    k = policy.choose(1)
    assert k >= 4
    policy.observe(k, [k], StepTimes(0.01 * k, 1.0))
    set_acceptance(policy, [0.0] * 8)  # drafting stops paying: the choice holds until it is made again
    held = []
    for _ in range(REDECIDE):
        held.append(policy.choose(1))
        policy.observe(held[-1], [0], StepTimes(0.01 * held[-1], 1.0))
        set_acceptance(policy, [0.0] * 8)
    assert held[:REDECIDE - 1] == [k] * (REDECIDE - 1) and held[-1] == 0
    set_acceptance(policy, [0.8] * 8)  # drafting pays again, and the drafter is behind now: chosen at once
    assert policy.choose(1) >= 4


def test_a_choice_timed_once_is_timed_again_before_it_anchors():
    """A draft length chosen on one timing (perhaps a lucky step) is timed again by its own next step before its steps
    set the machine's speed and its level holds still: anchored at once, a lucky first timing stood for good."""
    policy = GammaPolicy(gamma="auto", max_gamma=3)  # first_gamma 3, no longer neighbour to climb to
    observe_plain(policy, 1, 1.0)
    costs = policy.buckets[batch_bucket(1)]
    k = policy.choose(1)
    assert k > 0
    policy.observe(k, [k], StepTimes(0.1 * k, 1.0))  # catches up: not timed
    policy.observe(k, [k], StepTimes(0.1 * k, 1.0))  # a lucky step: 1.3 plain steps
    set_acceptance(policy, [0.9] * 3)
    chosen = policy.choose(1)
    assert chosen == k and not costs.anchors(k) and len(costs.relative[k]) == 1
    lucky = costs.log_s[k]
    policy.observe(k, [k], StepTimes(0.1 * k, 2.0))  # its own next step, slower: a second timing
    assert costs.log_s[k] > lucky and len(costs.relative[k]) == ANCHOR_SAMPLES
    set_acceptance(policy, [0.9] * 3)
    policy.choose(1)
    assert costs.anchors(costs.decided[1])


def test_a_choice_of_plain_decoding_holds_until_a_step_drafts():
    """While plain decoding is the choice nothing it rests on changes but the machine's speed and the tokens left (which
    only make a switch to drafting dearer), so it is made again only after a step drafts (a probe: new timings and
    acceptance) or when rows join, not every REDECIDE steps: at batch 1 the choices made every 8 steps cost 1-1.5% of
    text-only's time on the demo world, where it decodes plainly."""
    from pipeline.engine.gamma import REDECIDE

    policy = policy_after(0.2, draft_s=0.1, verify_s=lambda q: 1.0 + q)  # drafting loses
    costs = policy.buckets[batch_bucket(1)]
    costs.next_probe = 1000  # no probes here
    policy.observe(0, [0], StepTimes(0.0, 2.0))  # the drafter behind from here on
    assert policy.choose(1) == 0
    made = costs.decided[0]
    for _ in range(3 * REDECIDE):
        policy.observe(0, [0], StepTimes(0.0, 2.0))
        assert policy.choose(1) == 0
    assert costs.decided[0] == made  # held
    policy.observe(4, [1], StepTimes(0.4, 6.0))  # a step drafts (a probe's): the choice is made again
    policy.choose(1)
    assert costs.decided[0] == costs.steps


def test_probes_are_charged_the_plain_steps_that_settle_after_drafting():
    """The SETTLE plain steps after drafting run slow and are not timed as plain decoding's cost; what they take beyond
    plain steps is measured and charged to a probe that drafts and comes back (or goes back and drafts again)."""
    policy = policy_after(0.2, draft_s=0.1, verify_s=lambda q: 1.0 + q)  # plain steps 2 s
    policy.observe(4, [1], StepTimes(0.4, 6.0))
    for _ in range(SETTLE):  # each 0.5 s slower than a plain step
        policy.observe(0, [0], StepTimes(0.0, 2.5))
    policy.observe(0, [0], StepTimes(0.0, 2.0))  # settled: timed, no charge
    costs = policy.buckets[batch_bucket(1)]
    assert costs.settle_s == pytest.approx(0.5 * SETTLE, rel=1e-3)
    charged = policy._probe_loss(1, 0, 4, 2, prefill_waits=False)
    costs.settle_s = None
    assert charged == pytest.approx(policy._probe_loss(1, 0, 4, 2, prefill_waits=False) + 0.5 * SETTLE / 2.0)
    assert policy._probe_loss(1, 0, 0, 1, prefill_waits=False) == 0.0  # no switch, no charge

def test_a_choice_to_draft_made_while_the_drafter_was_behind_stands_once_it_has_caught_up():
    """At a row's start the drafter's prefill waits, and drafting is chosen with that switch priced in. Once the
    drafting step has caught the drafter up, the same data would choose the same draft length (a switch adds the same
    cost to each token whatever the length, and without it drafting only gains), so the choice is not made again; it
    still is when the drafter falls behind again (a plain probe)."""
    policy = policy_after(0.8, draft_s=0.01, verify_s=lambda q: 1.0)
    policy.observe_finished([24] * 4)  # rows' lengths: a switch is spread over the tokens a row has left
    policy.observe_drafter_prefill(1, 1, 2.0)  # a dear prefill: it lowers drafting's rate, not the best length
    costs = policy.buckets[batch_bucket(1)]
    costs.next_probe = 1000  # no probes here
    k = policy.choose(1, prefill_waits=True, emitted=[0])
    assert k >= 4 and costs.decided == (costs.steps, k, True)
    assert policy.best_gamma(1, prefill_waits=False, emitted=[0]) == k  # the same without the switch
    made = costs.decided[0]
    policy.observe(k, [k], StepTimes(0.01 * k, 1.0))  # the drafter caught up in this step
    assert policy.choose(1, prefill_waits=False, emitted=[k + 1]) == k and costs.decided == (made, k, False)
    policy.observe(k, [k], StepTimes(0.01 * k, 1.0))
    policy.observe(0, [0], StepTimes(0.0, 1.0))  # a plain step: the drafter is behind again, the choice made anew
    policy.choose(1, prefill_waits=False, emitted=[2 * k + 3])
    assert costs.decided[0] == costs.steps and costs.decided[2]


def test_a_choice_is_made_again_when_rows_join():
    """Rows joining (a static batch's next one) make the choice again at once: a switch to drafting has the most tokens
    to pay for the drafter's prefill there, and a choice made mid-batch, with a few tokens a row left, had held on."""
    policy = policy_after(0.8, draft_s=0.01, verify_s=lambda q: 1.0)
    policy.probe_every = policy.max_probe_every = 1000  # no probes here
    for costs in policy.buckets.values():
        costs.next_probe = 1000
    k = policy.choose(1)
    policy.observe(k, [k], StepTimes(0.01 * k, 1.0))
    set_acceptance(policy, [0.0] * 8)  # drafting stops paying: the choice holds ...
    assert policy.choose(1) == k
    policy.observe(k, [0], StepTimes(0.01 * k, 1.0))
    set_acceptance(policy, [0.0] * 8)
    policy.observe_prefill()  # ... until rows join
    assert policy.choose(1) == 0


def test_plain_decoding_chosen_on_one_timing_of_drafting_times_it_again_at_once():
    """Plain decoding chosen on one timing of drafting, by less than one timing's noise (MSD at batch 8 on the demo
    world: 3 drafts timed once, 4 predicted from it the contender), times those drafts again at once and for free,
    rather than when the probes' budget allows (there, hundreds of steps later: a static batch's drafter prefill priced
    every probe, and plain decoding held on in 10 of 16 fresh policies, at 0.86 and 0.89 of the best fixed gamma)."""
    policy = GammaPolicy(gamma="auto", max_gamma=8)
    observe_plain(policy, 8, 1.0)
    for _ in range(2):  # the first catches up, the second is timed: 3.6 plain steps
        policy.observe(3, [3] * 8, StepTimes(0.6, 3.0))
    observe_plain(policy, 8, 1.0)
    set_acceptance(policy, [0.95] * 8)
    assert policy.best_gamma(8) == 0 and policy._contender(8, False, None)[0] == 4
    choices = []
    for _ in range(3):
        choices.append(policy.choose(8))
        policy.observe(choices[-1], [3] * 8, StepTimes(0.6, 2.4))  # 3 drafts cost 3.0 plain steps now
    costs = policy.buckets[4]
    # the probe's steps after its catch-up each time 3 drafts (measured against plain decoding, the choice)
    assert choices[:2] == [3, 3] and len(costs.relative[3]) == 1 + 2 and costs.probe_losses == 0
    assert choices[2] > 0  # drafting, now that its cost is known better


def test_plain_decoding_is_timed_several_times_before_drafting_is_first_timed():
    """Drafting's first timings at a bucket are set against plain decoding's level there, so where the batch drains
    that level is the mean of PLAIN_TIMINGS plain steps: set by one, a lucky plain step made every draft length read
    dear for good (MSD at a static batch of 8 on the demo world: 3 drafts read 2.62-3.27 plain steps in fresh
    policies, their rechecks set against the same plain step, and 12 of 48 policies decoded plainly at 8 rows, where
    drafting ran 1.2x)."""
    policy = GammaPolicy(gamma="auto", max_gamma=8)
    plain = [0.8] + [1.0] * (PLAIN_TIMINGS - 1)  # a lucky first step
    choices = []
    for seconds in plain:
        choices.append(policy.choose(8, drains=True))
        policy.observe(choices[-1], [0] * 8, StepTimes(0.0, seconds))
    assert PLAIN_TIMINGS > 1 and choices == [0] * PLAIN_TIMINGS and policy.choose(8, drains=True) == FIRST_GAMMA
    level = math.prod(plain) ** (1 / PLAIN_TIMINGS)
    assert policy.step_seconds(0, 8) == pytest.approx(level)
    observe_drafting(policy, 8, FIRST_GAMMA, 0.9, 3.0)
    assert policy.step_seconds(FIRST_GAMMA, 8) / policy.step_seconds(0, 8) == pytest.approx(3.0 / level)

    rows_join = GammaPolicy(gamma="auto", max_gamma=8)  # continuous batching: one plain timing, as before
    rows_join.observe(rows_join.choose(8), [0] * 8, StepTimes(0.0, 0.8))
    assert rows_join.choose(8) == FIRST_GAMMA


def test_a_draft_length_predicted_from_a_timed_one_is_as_sure_as_that_one():
    """A draft length not timed yet is predicted from the nearest one timed, so where the batch drains the standard
    error that drafting must clear is that length's: counted as a single timing, the contender (usually a length not
    timed yet, one beyond the lengths timed) had to promise a gain of about 0.2 on this VM, where MSD's drafting at
    a static batch of 8 gains 0.15-0.25, and the choice at 8 rows flipped between plain decoding and drafting as the
    contender moved."""
    policy = GammaPolicy(gamma="auto", max_gamma=4)
    for _ in range(STEP_SAMPLES):  # 3 drafts timed STEP_SAMPLES times, each against the plain steps just before
        observe_plain(policy, 8, 1.0)
        observe_drafting(policy, 8, 3, 0.9, 3.0)
    set_acceptance(policy, [0.87] * 4)  # 4 drafts, predicted at 3.3 plain steps: 3.86 tokens a step
    policy._draining = True  # a static batch (see PLAIN_TIMINGS)
    contender, gain, standard_error = policy._contender(8, False, None)
    spread = policy._speed.spread(policy.step_spread)
    assert len(policy.buckets[4].relative[3]) == STEP_SAMPLES
    assert contender == 4 and 4 not in policy.buckets[4].log_s and gain == pytest.approx(0.17, abs=0.01)
    assert standard_error == pytest.approx(spread * math.sqrt(2 / STEP_SAMPLES))
    assert policy.margin + standard_error < gain < policy.margin + spread * math.sqrt(1 / STEP_SAMPLES + 1)
    assert policy.best_gamma(8) == 4
    policy._draining = False  # rows join (continuous batching): counted as one timing, as before
    assert policy._contender(8, False, None)[2] == pytest.approx(spread * math.sqrt(1 / STEP_SAMPLES + 1))
    assert policy.best_gamma(8) == 0


def test_a_bucket_is_timed_against_the_machines_speed_just_before_whichever_bucket_set_it():
    """A static batch times its top bucket (32 rows) at its start, drains through the others, and the next batch comes
    back to the top: its first timing there of 2 drafts is set against the speed the 16-row steps just measured (the
    machine now runs twice as slow), not the top bucket's own speed of a whole batch before; set against that, 2 drafts
    looked 2.6 times a plain step where they cost 1.3 times one."""
    policy = GammaPolicy(gamma="auto", max_gamma=8)
    observe_plain(policy, 32, 1.0)  # the first batch: plain decoding at 32 rows, 1 s a step
    for _ in range(2):  # 3 drafts (the first step catches up, the second is timed)
        policy.observe(3, [1] * 32, StepTimes(0.3, 1.2))
    observe_plain(policy, 16, 0.8)  # it drains to 16 rows: 0.8 s a plain step there
    for _ in range(20):  # then the machine runs twice as slow
        policy.observe(0, [0] * 16, StepTimes(0.0, 1.6))
    for _ in range(2):  # the next batch at 32 rows: 2 drafts, 1.3 s a step at the usual speed, 2.6 s now
        policy.observe(2, [1] * 32, StepTimes(0.4, 2.2))
    assert policy.step_seconds(2, 32) / policy.step_seconds(0, 32) == pytest.approx(1.3, rel=0.02)


def test_while_plain_decoding_is_the_choice_its_probes_time_the_draft_length_that_came_closest():
    """Drafting costs a fixed 0.6 of a plain step plus 0.1 a draft (MSD's head reads the target's features), with
    acceptance falling along the draft: 1 draft is 1.06x plain decoding, 2 drafts 1.27x, 3 drafts 1.30x. The one timing
    of 3 drafts came at a slow moment (15% slow: 1.13x, under the margin plus its standard error on one step), so plain
    decoding is chosen. Probes of the choice's neighbour (1 draft, which does not pay) left it there for good; probes of
    the draft length that came closest time it until its mean says it pays."""
    policy = GammaPolicy(gamma="auto", max_gamma=8)
    acceptance = [0.8, 0.6, 0.4] + [0.4] * 5
    choices, decisions = [], []
    for _ in range(400):
        set_acceptance(policy, acceptance)
        k = policy.choose(8)
        choices.append(k)
        decided = policy.buckets[batch_bucket(8)].decided
        if decided is not None and decided[0] == policy.buckets[batch_bucket(8)].steps:  # a choice made at this step
            decisions.append((len(choices) - 1, decided[1]))
        slow_moment = 1.15 if k == 3 and choices.count(3) <= 2 else 1.0  # the first two steps with 3 drafts
        policy.observe(k, [min(k, 2)] * 8, StepTimes(0.1 * k, (1.6 if k else 1.0) * slow_moment))
    first = decisions[0][0]
    assert decisions[0][1] == 0  # plain decoding chosen first
    assert choices[first:first + CONTENDER_STEPS + 1] == [3] * (CONTENDER_STEPS + 1)  # its probe times 3 drafts
    assert sum(k in (2, 3, 4) for k in choices[100:]) >= 0.9 * 300


def decode_switching(policy: GammaPolicy, acceptance: list[float], steps: int, drafting_verify_s: float) -> list[int]:
    """auto's choices at 8 rows, step by step: a plain step costs 1 s, one with k drafts 0.1 k + drafting_verify_s (each
    row keeping one draft), and the first drafting step after plain ones 2 s more (the drafter's catch-up)."""
    choices = []
    for _ in range(steps):
        set_acceptance(policy, acceptance)
        k = policy.choose(8)
        catch_up = 2.0 if k and choices[-1:] == [0] else 0.0
        choices.append(k)
        policy.observe(k, [min(k, 1)] * 8, StepTimes(0.1 * k + catch_up, drafting_verify_s if k else 1.0))
    return choices


def test_while_drafting_is_predicted_to_gain_its_probes_may_cost_what_plain_decoding_is_predicted_to_lose():
    """One draft keeps 0.6 of the rows' drafts, two 0.4 of the second, and a step with k drafts costs 1.3 + 0.1 k plain
    steps: 2 drafts run 1.23x plain decoding. Their first timing came at a slow moment (15% slow: predicted 1.09x,
    under the margin plus the standard error of one timing), so plain decoding is the choice; and every switch to
    drafting costs a catch-up of 2 plain steps. Within 1% of the time, a probe of drafting waited about 190 steps (MSD
    at batch 8 on the demo world: 180 steps at its top bucket, two passes over the bench's rows, on one timing of
    drafting); but staying plain is predicted to lose 9% a step, and probes may cost that much too."""
    policy = GammaPolicy(gamma="auto", max_gamma=8)
    acceptance = [0.6, 0.4, 0.2] + [0.2] * 5
    set_acceptance(policy, acceptance)
    observe_plain(policy, 8, 1.0)
    policy.observe(3, [1] * 8, StepTimes(0.3 + 2.0, 1.3))  # the switch to drafting: a catch-up (not timed)
    policy.observe(3, [1] * 8, StepTimes(0.3, 1.3 * 1.15))  # timed, at a slow moment
    observe_plain(policy, 8, 1.0)
    policy.observe(3, [1] * 8, StepTimes(0.3 + 2.0, 1.3))  # another switch: what a catch-up costs is measured now
    observe_plain(policy, 8, 1.0)
    set_acceptance(policy, acceptance)
    assert policy.buckets[4].catch_up_s == pytest.approx(2.0)
    contender, gain, _ = policy._contender(8, False, None)
    assert contender == 2 and 0.05 < gain < policy.margin + policy.step_spread and policy.best_gamma(8) == 0
    choices = decode_switching(policy, acceptance, 300, drafting_verify_s=1.3)
    first_probe = next(i for i, k in enumerate(choices) if k)
    assert first_probe < 20
    assert sum(k > 0 for k in choices[first_probe:]) >= 0.95 * len(choices[first_probe:])


def test_once_drafting_has_a_full_set_of_timings_probing_it_costs_one_percent_again():
    """Two drafts run 1.08x plain decoding here, timed STEP_SAMPLES times: under the margin plus the standard error of
    a full set of timings, so plain decoding stays the choice, and more timings cannot shrink that error. Probes of
    drafting (each paying a 2-step catch-up) then come within `exploration` alone, not `exploration` plus the gain: in
    a long job, probes at 1% + 8% of the time would cost more than they could ever settle."""
    policy = GammaPolicy(gamma="auto", max_gamma=2)
    acceptance = [0.6, 0.4]
    set_acceptance(policy, acceptance)
    observe_plain(policy, 8, 1.0)
    for _ in range(STEP_SAMPLES):
        policy.observe(2, [1] * 8, StepTimes(0.2 + 2.0, 1.504))  # the switch: a catch-up (not timed)
        policy.observe(2, [1] * 8, StepTimes(0.2, 1.504))  # 1.84 tokens for 1.704 plain steps' time
        observe_plain(policy, 8, 1.0)
    set_acceptance(policy, acceptance)
    contender, gain, _ = policy._contender(8, False, None)
    assert contender == 2 and gain == pytest.approx(0.08, abs=0.01) and policy.best_gamma(8) == 0
    choices = decode_switching(policy, acceptance, 600, drafting_verify_s=1.504)
    probes = len(re.findall("d+", "".join("p" if k == 0 else "d" for k in choices)))
    assert 1 <= probes <= 4  # each loses its 2-step switch: 1% of 600 steps covers 3


def test_probes_are_measured_against_the_choice_whose_level_holds_still():
    """Plain decoding is the choice (3 drafts cost 2 plain steps and yield 2.3 tokens) and plain steps after drafting
    run slow for a while (+30%, +18%, +11%, ...: the machine's caches, see SETTLE), so the probe of plain decoding's
    first timed step after a probe of drafting reads 10% slow. Timed as a sample of plain decoding, each such step
    raised its level, the steady plain steps then read the machine as faster, the next probe of drafting as dearer, and
    drafting's samples trailed plain decoding's rising level: S(3) / S(0) read 5% cheap here (0.18-0.28 log at the demo
    world's batch 32, where bucket changes add to it). The choice's steps set the machine's speed and probes alone are
    samples: the ratio is what a probe's step costs against the choice's steps around it."""
    policy = GammaPolicy(gamma="auto", max_gamma=4)
    since_drafting = 99
    for _ in range(3000):
        set_acceptance(policy, [0.5] * 4)
        k = policy.choose(32)
        since_drafting = 0 if k else since_drafting + 1
        unsettled = 0.3 * 0.6 ** (since_drafting - 1) if k == 0 and since_drafting <= 8 else 0.0
        policy.observe(k, [2] * 32, StepTimes(0.1 * k, 2.0 - 0.1 * k if k else 1.0 + unsettled))
    costs = policy.buckets[batch_bucket(32)]
    assert costs.decided[1] == 0
    assert costs.log_s[3] - costs.log_s[0] == pytest.approx(math.log(2.0), abs=0.01)


def test_a_stalled_step_neither_sets_the_machines_speed_nor_is_a_probes_reference():
    """Plain decoding is the choice (as above) and every seventh step stalls, five times its cost (the VM's
    interference). Taken as the machine's speed, a stall read it several times slow, and a probe of drafting right
    after was measured against that: drafting read far cheaper than it is (text-only at batch 8 on the demo world: a
    plain step of 2.9 ms among 0.56 ms ones, then 4 drafts rated 0.49 ms where they cost 1.4, and that bucket drafted
    on for good). A stall is left out; two slow steps in a row are the machine itself."""
    policy = GammaPolicy(gamma="auto", max_gamma=4)
    for step in range(3000):
        set_acceptance(policy, [0.5] * 4)
        k = policy.choose(32)
        stall = 5.0 if step % 7 == 6 else 1.0
        policy.observe(k, [2] * 32, StepTimes(0.1 * k * stall, (1.7 if k else 1.0) * stall))
    costs = policy.buckets[batch_bucket(32)]
    assert costs.decided[1] == 0
    assert costs.log_s[3] - costs.log_s[0] == pytest.approx(math.log(2.0), abs=0.05)
    slower = GammaPolicy(gamma="auto", max_gamma=4)  # the machine slows down for good: it follows
    for step in range(200):
        set_acceptance(slower, [0.5] * 4)
        k = slower.choose(32)
        slower.observe(k, [2] * 32, StepTimes(0.1 * k, 1.7 if k else 1.0) if step < 100 else
                       StepTimes(0.3 * k, 5.1 if k else 3.0))
    assert slower._speed.log == pytest.approx(math.log(3.0), abs=0.05)


def timed_rounds(policy: GammaPolicy, drafting_s: float, noise: list[float], rounds: int = 6, steady: int = 30) -> None:
    """At 8 rows, one draft keeping half the drafts: rounds of plain steps (1 s) and then a switch to one draft
    (its catch-up untimed, then a step of drafting_s), each step's time times the next of `noise`, cycled."""
    factors = iter(noise * (rounds * (steady + SETTLE + 3)))
    for _ in range(rounds):
        for _ in range(SETTLE + 1 + steady):
            policy.observe(0, [0] * 8, StepTimes(0.0, next(factors)))
        for _ in range(2):
            policy.observe(1, [1, 0] * 4, StepTimes(0.0, drafting_s * next(factors)))
    set_acceptance(policy, [0.5])


def test_the_bar_for_drafting_is_the_machines_own_timing_noise():
    """One draft runs 1.08x plain decoding, timed six times: under the margin plus the standard error of six timings
    spreading by `step_spread` (0.15: this VM's), over it where the machine's steady steps time alike (a GPU's), so
    there it drafts; where its steps spread by 15% it decodes plainly. Against an assumed 15% spread, a GPU's timings
    would hold drafting back wherever it gains under 12%."""
    drafting_s = 1.5 / 1.08  # a step with one draft emits 1.5 tokens a row
    quiet, noisy = GammaPolicy(gamma="auto", max_gamma=1), GammaPolicy(gamma="auto", max_gamma=1)
    timed_rounds(quiet, drafting_s, [1.0])
    timed_rounds(noisy, drafting_s, [math.exp(0.15), math.exp(-0.15)])
    for policy in (quiet, noisy):
        contender, gain, _ = policy._contender(8, False, None)
        assert contender == 1 and gain == pytest.approx(0.08, abs=0.03)
    assert quiet.best_gamma(8) == 1 and noisy.best_gamma(8) == 0


def test_below_a_bucket_that_drafts_a_draining_batch_decodes_plainly_only_where_plain_decoding_wins():
    """Drafting pays at least as well with fewer rows (a verification costs less with the batch, a draft no more), and
    a static batch drains through its small buckets in a few steps each, too few timings for drafting to clear the bar
    there on their own. So where the nearest larger bucket drafts and the batch's last step drafted, a bucket drafts
    unless plain decoding beats drafting by the bar: at 2 rows 3 drafts timed once at 2.0 plain steps (2.18 tokens a
    step), plain decoding once, are drafted, under the margin plus their standard error; at 3.0 plain steps plain
    decoding wins. Where the batch decoded plainly above, or rows join (continuous batching), the bucket's own timings
    decide as before."""
    def draining_from_8(draft_step_at_2: float, draft_step_at_8: float, drains: bool = True) -> GammaPolicy:
        policy = GammaPolicy(gamma="auto", max_gamma=3)
        for rows, draft_step in ((2, draft_step_at_2), (8, draft_step_at_8)):
            observe_plain(policy, rows, 1.0)
            observe_drafting(policy, rows, 3, 0.9, draft_step)
        set_acceptance(policy, [0.6] * 3)  # 3 drafts: 2.18 tokens a step
        policy.observe_prefill()
        k = policy.choose(8, drains=drains)  # the batch's top bucket decides
        policy.observe(k, [min(k, 2)] * 8, StepTimes(0.9 if k else 0.0, draft_step_at_8 - 0.9 if k else 1.0))
        return policy

    drafting_above = draining_from_8(draft_step_at_2=2.0, draft_step_at_8=1.4)
    contender, gain, standard_error = drafting_above._contender(2, False, None)
    assert contender > 0 and 0 < gain < drafting_above.margin + standard_error  # on its own: plain decoding
    assert drafting_above.best_gamma(2) == contender
    assert draining_from_8(draft_step_at_2=3.0, draft_step_at_8=1.4).best_gamma(2) == 0  # plain decoding wins
    assert draining_from_8(draft_step_at_2=2.0, draft_step_at_8=2.6).best_gamma(2) == 0  # plain above
    assert draining_from_8(draft_step_at_2=2.0, draft_step_at_8=1.4, drains=False).best_gamma(2) == 0
