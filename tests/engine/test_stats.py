"""Statistics are summable counts; rates come out only when reporting."""

import pytest

from pipeline.engine.stats import SpecDecodeCounts


def test_counts_add_up_across_rows_and_batches():
    a = SpecDecodeCounts(num_sequences=1)
    a.observe_step(num_drafted=3, num_accepted=3)
    a.observe_step(num_drafted=3, num_accepted=1)
    a.observe_tokens(1 + 4 + 2)
    b = SpecDecodeCounts(num_sequences=1)
    b.observe_step(num_drafted=5, num_accepted=0)
    b.observe_tokens(2)
    total = SpecDecodeCounts()
    total.observe(a)
    total.observe(b)
    assert (total.num_sequences, total.num_steps, total.num_drafted, total.num_accepted) == (2, 3, 11, 4)
    assert total.num_generated_tokens == 9
    assert total.drafted_per_position == [3, 3, 3, 1, 1]
    assert total.accepted_per_position == [2, 1, 1, 0, 0]
    assert total.mean_accepted_length == 1 + 4 / 3
    assert total.acceptance_rate == 4 / 11
    assert total.acceptance_per_position == [2 / 3, 1 / 3, 1 / 3, 0.0, 0.0]
    assert total.report()["tau"] == round(1 + 4 / 3, 4)


def test_rates_of_nothing():
    """Before any step a row emitted one token per step (tau 1, as plain decoding) and accepted nothing."""
    empty = SpecDecodeCounts()
    assert empty.mean_accepted_length == 1.0 and empty.acceptance_rate == 0.0


def test_engine_times_split_a_run_into_phases():
    from pipeline.engine.stats import EngineTimes, StepTimes

    times = EngineTimes()
    times.observe_prefill(1.0)
    times.observe_step(k=3, rows=4, step=StepTimes(draft_s=0.6, verify_s=1.0, bookkeeping_s=0.1))
    times.observe_step(k=0, rows=2, step=StepTimes(draft_s=0.0, verify_s=0.8))
    times.observe_generate(4.0)
    assert times.seconds_per_draft_forward == pytest.approx(0.2) and times.seconds_per_verify == pytest.approx(0.9)
    assert times.decode_s == 3.0 and times.other_s == pytest.approx(0.6) and times.mean_rows_per_step == 3.0
    assert times.shares() == pytest.approx({"prefill": 0.25, "draft": 0.15, "verify": 0.45, "other": 0.15})
    assert EngineTimes().shares() == {"prefill": 0.0, "draft": 0.0, "verify": 0.0, "other": 0.0}
