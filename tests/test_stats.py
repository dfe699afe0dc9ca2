"""Statistics are summable counts; rates come out only when reporting."""

from pipeline.stats import SpecDecodeCounts


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


def test_rates_of_nothing_are_zero():
    empty = SpecDecodeCounts()
    assert empty.mean_accepted_length == 0.0 and empty.acceptance_rate == 0.0
