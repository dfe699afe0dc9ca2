"""Bad rows get a correct result or their own clear error; the rest of the batch is unaffected."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import hf_greedy, prepare_rows, ragged_rows
from PIL import Image

from pipeline.engine.engine import FINISH_LENGTH, EngineConfig, SpecDecodeEngine
from pipeline.engine.prompts import PromptError, prepare_prompt, to_rgb


def unusual_images() -> dict[str, Image.Image]:
    rgba = Image.new("RGBA", (20, 16), (255, 0, 0, 0))  # fully transparent red: white after compositing
    gray = Image.new("L", (18, 18), 90)
    palette = Image.new("RGB", (16, 20), (0, 0, 255)).convert("P", palette=Image.ADAPTIVE)
    sixteen = Image.fromarray(np.full((12, 14), 65535, dtype=np.uint16))
    return {"RGBA": rgba, "L": gray, "P": palette, "I;16": sixteen, "1x1": Image.new("RGB", (1, 1), (9, 9, 9))}


def test_unusual_modes_become_rgb():
    images = unusual_images()
    converted = {name: to_rgb(im) for name, im in images.items()}
    assert images["I;16"].mode == "I;16"
    assert all(im.mode == "RGB" for im in converted.values())
    assert converted["RGBA"].getpixel((0, 0)) == (255, 255, 255)
    assert converted["I;16"].getpixel((0, 0)) == (255, 255, 255)  # full-scale 16-bit is white, not clipped noise
    assert converted["L"].getpixel((0, 0)) == (90, 90, 90)
    assert converted["P"].getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_5_vl", "qwen3_vl"])
def test_bad_rows_fail_alone_and_good_rows_are_unchanged(targets, family):
    target = targets[family]
    good = ragged_rows(3)
    rows = {
        "empty prompt": ("   ", good[0][1]),
        "null prompt": (None, good[0][1]),
        "too long": ("shape " * 600, good[0][1]),
        "not an image": ("Describe the image.", b"\x89PNG not really"),
    }
    errors = {}
    for name, (prompt, image) in rows.items():
        with pytest.raises(PromptError) as info:
            prepare_prompt(target.processor, prompt, image, target.context_length)
        errors[name] = str(info.value)
    assert errors["empty prompt"] == errors["null prompt"] == "prompt is empty"
    assert "context of 512" in errors["too long"]
    assert "not a decoded image" in errors["not an image"]

    # Unusual images, a missing image (text-only row) and max_new_tokens 0 run beside good rows.
    unusual = [("Describe the image.", im) for im in unusual_images().values()] + [("What is this?", None)]
    prompts = prepare_rows(target, good + unusual)
    budgets = [12] * len(prompts)
    budgets[1] = 0
    engine = SpecDecodeEngine(target, None, EngineConfig(max_new_tokens=12))
    results = engine.generate(prompts, max_new_tokens=budgets)
    assert results[1].tokens == [] and results[1].finish_reason == FINISH_LENGTH and results[1].text == ""
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        if i != 1:
            assert result.tokens == hf_greedy(target, prompt, 12), f"row {i}"


def test_truncated_image_file_is_a_row_error(targets):
    target = targets["llava"]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[:60]))  # header parses, pixels do not
    with pytest.raises(PromptError, match="cannot be decoded"):
        prepare_prompt(target.processor, "Describe the image.", truncated, target.context_length)


def test_generation_stops_at_the_context(targets):
    target = targets["llava"]
    prompt = prepare_prompt(target.processor, "shape " * 460, None, target.context_length)
    room = target.context_length - len(prompt.input_ids)
    assert 0 < room < 40
    result = SpecDecodeEngine(target, None, EngineConfig(max_new_tokens=100)).generate([prompt])[0]
    assert len(result.tokens) <= room
