"""The truth check of `auto`'s step costs (jobs/gamma_truth.py): it measures a policy's estimates against fixed-gamma
engines on the same rows, so an estimate off by a known factor shows as that factor."""

import json
import math
from pathlib import Path

import pytest

from pipeline.engine.gamma import GammaPolicy
from pipeline.job.config import JobConfigError
from pipeline.lab.gamma_truth import TruthConfig, choices_by_bucket, run_truth


class QuarteredDrafting(GammaPolicy):
    """auto's own choices, but it reports every drafting step as costing a quarter of what it estimates."""

    def step_seconds(self, k: int, batch_size: int) -> float:
        return super().step_seconds(k, batch_size) * (0.25 if k else 1.0)


def median_shift(before: dict, after: dict) -> float:
    """The median, over the (bucket, k) both runs estimated, of how far the second's median log error lies from the
    first's (the two runs' policies time different buckets and draft lengths: their overall medians mix them)."""
    errors = [{(e["bucket"], e["k"]): e["median"] for e in results["errors"]} for results in (before, after)]
    shifts = sorted(errors[1][key] - errors[0][key] for key in errors[0].keys() & errors[1].keys())
    assert shifts, "the two runs estimated no draft length at the same bucket"
    return shifts[len(shifts) // 2]


def test_an_estimate_off_by_a_factor_shows_as_that_factor(tmp_path):
    config = TruthConfig(rows=16, batch_size=8, gammas=[3], reps=1, max_new_tokens=24, output=str(tmp_path))
    assert config.gammas == [0, 3]  # plain decoding is always the reference
    lines = []
    own = run_truth(config, log=lines.append)
    quartered = run_truth(config, make_policy=lambda: QuarteredDrafting(gamma="auto"), log=lines.append)
    assert all(math.isfinite(e["median"]) and e["steps"] > 0 for e in own["errors"])
    # the same decisions, reported at a quarter of the cost: log(0.25) = -1.39 lower, give or take the two runs'
    # timing noise on 16 rows (-0.99 to -1.55 over 8 trials): nearer log(0.25) than no shift or twice the shift
    assert math.log(0.25) * 1.5 < median_shift(own, quartered) < math.log(0.25) / 2
    assert 0 < own["auto_vs_plain"] and own["best_fixed"] == 3
    assert any("median log error" in line for line in lines)
    # which draft lengths auto chose: at 8 rows (bucket 4) among others, every timed step counted once
    assert any("draft lengths chosen" in line for line in lines)
    assert 4 in [c["bucket"] for c in own["choices"]]
    assert all(sum(c["steps"].values()) > 0 and len(c["most_chosen_per_rep"]) == 1 for c in own["choices"])
    saved = json.loads((Path(tmp_path) / "results.json").read_text())
    assert saved["config"]["gammas"] == [0, 3] and saved["results"][0]["errors"]


def test_choices_count_the_timed_passes_per_bucket_and_rep():
    steps = [  # (rep, pass, k, rows, seconds); pass 0 is the warm-up
        (0, 0, 0, 8, 1.0), (0, 1, 3, 8, 1.0), (0, 1, 3, 8, 1.0), (0, 2, 0, 5, 1.0),
        (1, 1, 0, 8, 1.0), (1, 3, 4, 1, 1.0),
    ]
    choices = choices_by_bucket(steps)
    assert {bucket: {rep: dict(c) for rep, c in by_rep.items()} for bucket, by_rep in choices.items()} == {
        4: {0: {3: 2}, 1: {0: 1}}, 3: {0: {0: 1}}, 1: {1: {4: 1}}}


def test_a_bad_configuration_fails_at_once_with_what_to_fix():
    with pytest.raises(JobConfigError, match="--drafter"):
        TruthConfig(drafter="eagle")
    with pytest.raises(JobConfigError, match="--reps"):
        TruthConfig(reps=0)
    with pytest.raises(JobConfigError, match="--gammas"):
        TruthConfig(gammas=[-1, 2])
