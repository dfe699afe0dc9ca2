"""Every job's command line is generated from its config dataclass: one flag per field, defaults written once."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from drafters.training import TrainConfig
from pipeline.job.cli import config_parser, parse_config
from pipeline.job.config import CaptionConfig
from pipeline.lab.benchmark import BenchConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
import build_demo_world  # noqa: E402


@pytest.mark.parametrize("config_cls", [CaptionConfig, TrainConfig, BenchConfig, build_demo_world.WorldConfig])
def test_every_field_is_a_flag_with_its_dataclass_default(config_cls):
    parser = config_parser(config_cls, "test")
    flags = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(config_cls) if f.init}
    for field in dataclasses.fields(config_cls):
        if field.default not in (dataclasses.MISSING, None) and not isinstance(field.default, bool):
            shown = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else str(field.default)
            assert f"(default {shown})" in flags[field.name].help, field.name


def test_flags_parse_into_the_config(tmp_path):
    config = parse_config(CaptionConfig, ["--input", "in", "--output", "out", "--target", "t", "--gamma", "4",
                                           "--num-actors", "1,3", "--keep-images", "--top-p", "0.5"], "test")
    assert (config.gamma, config.num_actors, config.keep_images, config.top_p) == (4, (1, 3), True, 0.5)
    assert config.batch_size == CaptionConfig.__dataclass_fields__["batch_size"].default
    assert config.gpus_per_actor is None and config.input.endswith("/in")  # paths made absolute by the config
    bench = parse_config(BenchConfig, ["--quick", "--no-caption-job", "--gammas", "1,auto"], "test")
    assert not bench.caption_job and bench.gammas == [1, "auto"]
    with pytest.raises(SystemExit):  # a required flag missing: argparse's usage error, exit code 2
        parse_config(CaptionConfig, ["--input", "in"], "test")
