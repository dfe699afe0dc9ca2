"""The family speed check: every family's tiny target decodes the same tokens on its exact stack as on HF's forward,
and the check reports each batch size; a bad configuration fails at once with one sentence."""

import json

import pytest

from pipeline.job.config import JobConfigError
from pipeline.lab.family_speed import FamilySpeedConfig, run_family_speed


def test_each_family_decodes_the_same_tokens_either_way(tmp_path):
    config = FamilySpeedConfig(rows=3, max_new_tokens=5, batch_sizes=[1, 3], rounds=1, output=str(tmp_path))
    lines = []
    results = run_family_speed(config, log=lines.append)
    assert [(r["family"], r["batch_size"]) for r in results] == [
        (family, b) for family in ("llava", "gemma3", "qwen2_5_vl", "qwen3_vl") for b in (1, 3)]
    assert all(r["same_tokens"] and r["exact_s"] > 0 and r["hf_forward_s"] > 0 for r in results)
    assert "| gemma3 | 3 |" in lines[-2] and json.loads((tmp_path / "results.json").read_text())["results"] == results


@pytest.mark.parametrize("bad, message", [({"families": ["llama"]}, "--families"), ({"rounds": 0}, "--rounds")])
def test_a_bad_configuration_fails_with_one_sentence(bad, message):
    with pytest.raises(JobConfigError, match=message):
        FamilySpeedConfig(**bad)
