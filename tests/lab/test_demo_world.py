"""The committed demo world loads through the user's path, its target reads the images, its drafters are lossless."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from drafters import load_drafter
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.prompts import prepare_prompt
from pipeline.engine.target import Target
from pipeline.job.preflight import preflight
from pipeline.lab.demo import DEMO_WORLD, demo_configs

ROWS = 24


@pytest.fixture(scope="module")
def demo():
    target = Target.load(str(DEMO_WORLD / "target"))
    rows = pq.read_table(DEMO_WORLD / "prompts").to_pylist()[:ROWS]
    prompts = [prepare_prompt(target.processor, r["prompt"], Image.open(io.BytesIO(r["image"])), target.context_length)
               for r in rows]
    return target, rows, prompts


def test_world_is_small_and_described():
    size = sum(f.stat().st_size for f in DEMO_WORLD.rglob("*") if f.is_file())
    assert size <= 25_000_000
    world = json.loads((DEMO_WORLD / "world.json").read_text())
    assert 10 <= world["target_parameters"] / world["drafter_parameters"] <= 20
    assert not list(DEMO_WORLD.rglob("*.bin")) and not list(DEMO_WORLD.rglob("*.pt"))


def test_demo_job_configuration_passes_preflight(tmp_path):
    for config in demo_configs(tmp_path).values():
        assert preflight(config).source.format == "parquet"


def test_target_answers_from_the_image(demo):
    target, rows, prompts = demo
    results = SpecDecodeEngine(target, None, EngineConfig(max_new_tokens=48)).generate(prompts)
    correct = sum(r.text.strip() == row["answer"] for r, row in zip(results, rows))
    assert correct >= ROWS // 2, [(r.text, row["answer"]) for r, row in zip(results, rows)]


@pytest.mark.parametrize("drafter", ["text-only", "massv-adapt", "massv", "msd"])
def test_trained_drafters_are_lossless(demo, drafter):
    target, _, prompts = demo
    config = EngineConfig(gamma=5, max_new_tokens=48)
    plain = SpecDecodeEngine(target, None, config).generate(prompts)
    drafted = SpecDecodeEngine(target, load_drafter(DEMO_WORLD / drafter, target), config).generate(prompts)
    assert [r.tokens for r in drafted] == [r.tokens for r in plain]
    assert sum(r.counts.num_accepted for r in drafted) > 0
