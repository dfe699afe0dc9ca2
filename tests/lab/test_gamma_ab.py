"""`auto` against another version of itself in one process (jobs/gamma_ab.py): the baseline is a module of its own,
its constants set before it runs, and every engine decodes the same rows to the same tokens."""

import json
from pathlib import Path

import pytest

from pipeline.engine import gamma
from pipeline.job.config import JobConfigError
from pipeline.lab.gamma_ab import PLAIN, ABConfig, baseline_source, load_policy_module, run_ab


def test_the_baseline_is_a_module_of_its_own_with_its_constants_set_before_it_runs():
    module = load_policy_module(baseline_source(gamma.__file__), {"SETTLE": 5})
    assert (module.SETTLE, module.PAIR_GAP) == (5, 6)  # derived from SETTLE where it is assigned
    assert module.GammaPolicy(gamma="auto")._plain_run == 5  # a field default read at class creation
    assert (gamma.SETTLE, gamma.PAIR_GAP) == (2, 3)  # this tree's policy untouched
    assert module.GammaPolicy is not gamma.GammaPolicy


def test_every_engine_decodes_the_same_rows_in_turn_to_the_same_tokens(tmp_path):
    config = ABConfig(drafter="text-only", rows=16, batch_size=8, repeats=2, max_new_tokens=16, policies=2,
                      baseline=gamma.__file__, baseline_constants="SETTLE=4", output=str(tmp_path))
    lines = []
    results = run_ab(config, log=lines.append)
    assert results["identical"]
    assert len(results["seconds"]) == 1 + 2 * 2  # plain decoding, and two fresh policies a side
    assert all(len(seconds) == 2 and min(seconds) > 0 for seconds in results["seconds"].values())
    assert len(results["side_median_vs_plain"]) == 2
    assert results["median_vs_plain"][PLAIN] == 1.0
    # each auto's choices counted in the timed rounds only: 16 rows of at most 16 tokens, 2 rounds
    for choices in results["choices"].values():
        assert 0 < sum(choices.values()) <= 2 * 2 * 16  # rounds x batches x steps a batch at most
    assert any("draft lengths chosen" in line for line in lines)
    # where each engine's time went against plain decoding's, over the timed rounds
    split = results["time_against_plain"]
    assert split[PLAIN]["total"] == split[PLAIN]["steps"] == 0.0 and split[PLAIN]["steps_run"] > 0
    for name, parts in split.items():
        assert parts["prefill"] + parts["steps"] + parts["other"] == pytest.approx(parts["total"], abs=1e-3)
        assert parts["drafting_steps"] <= parts["steps_run"]
        if name != PLAIN:  # the timed rounds' steps, as counted by the choices
            assert parts["steps_run"] == sum(results["choices"][name].values())
        if parts["drafting_steps"]:  # a static batch that drafts pays its drafter's put-off prefill first
            assert parts["drafter_prefills"] > 0 and parts["drafter_prefill_s"] > 0
    assert any("drafter prefills" in line for line in lines)
    saved = json.loads((Path(tmp_path) / "results.json").read_text())
    assert saved["config"]["baseline_constants"] == "SETTLE=4"


def test_a_bad_configuration_fails_at_once_with_what_to_fix():
    with pytest.raises(JobConfigError, match="--baseline-constants"):
        ABConfig(baseline_constants="SETTLE=four")
    with pytest.raises(JobConfigError, match="--baseline-constants"):
        ABConfig(baseline_constants="NOT_A_CONSTANT=1")
    with pytest.raises(JobConfigError, match="--baseline no-such-revision"):
        baseline_source("no-such-revision")
    with pytest.raises(JobConfigError, match="--drafter"):
        ABConfig(drafter="eagle")
    with pytest.raises(JobConfigError, match="--policies"):
        ABConfig(policies=0)
