"""Shared fixtures: tiny checkpoints of both families, built once per session, and ragged prompts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import tiny_models  # noqa: E402
from pipeline.preprocess import prepare_prompt  # noqa: E402
from pipeline.target import Target  # noqa: E402

QUESTIONS = [
    "Describe the image.",
    "What colour is the shape on the left of the grey background?",
    "How many shapes are there?",
    "the image shows a small red circle. What else?",
    "Is there a star?",
    "Describe the image in one long sentence with every colour you can see and where each shape is.",
    "hi",
]


def ragged_rows(n: int) -> list[tuple[str, Image.Image | None]]:
    """n rows of varied prompt lengths and image sizes; every 5th row has no image."""
    rows = []
    for i in range(n):
        colour = [(220, 30, 30), (30, 160, 60), (40, 60, 220), (230, 200, 40)][i % 4]
        image = Image.new("RGB", (24 + 7 * i, 40 - i), (100 + 5 * i, 100, 100))
        image.paste(colour, (2, 2, 12 + i, 14))
        rows.append((QUESTIONS[i % len(QUESTIONS)], None if i % 5 == 4 else image))
    return rows


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """family -> {"target", "text-only", "massv", "massv-oracle"} checkpoint directories."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny_models.build_world(family, root / family) for family in tiny_models.FAMILIES}


@pytest.fixture(scope="session")
def targets(world):
    return {family: Target.load(str(paths["target"])) for family, paths in world.items()}


def prepare_rows(target: Target, rows):
    return [prepare_prompt(target.processor, p, im, target.context_length) for p, im in rows]


def hf_greedy(target: Target, prompt, max_new_tokens: int) -> list[int]:
    """The target's own greedy output for one row, through HF generate (no padding)."""
    inputs = {"input_ids": torch.tensor([prompt.input_ids], device=target.device)}
    inputs.update({k: v.to(target.device) for k, v in prompt.vision_inputs.items()})
    inputs.update({k: torch.tensor([v], device=target.device) for k, v in prompt.token_inputs.items()})
    out = target.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt.input_ids) :].tolist()
