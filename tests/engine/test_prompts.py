"""Rows prepared together (one processor call per group of rows) are the rows prepared one by one, bit for bit, for
every family; a bad row fails alone with its own error."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_qwen_families import transformers_processor

from pipeline.engine.prompts import (
    BATCHED_PROCESSORS,
    _prepared_together,
    _templated,
    prepare_prompt,
    prepare_prompts,
    special_token_texts,
)
from pipeline.lab import tiny_models


def one_by_one(processor, context_length, rows):
    out = []
    for prompt, image in rows:
        try:
            out.append(prepare_prompt(processor, prompt, image, context_length))
        except Exception as exc:
            out.append(exc)
    return out


def assert_same(together, alone):
    assert type(together) is type(alone)
    if isinstance(alone, Exception):
        assert str(together) == str(alone)
        return
    assert together.input_ids == alone.input_ids
    assert together.token_inputs == alone.token_inputs
    assert together.vision_inputs.keys() == alone.vision_inputs.keys()
    for key, tensor in alone.vision_inputs.items():
        assert torch.equal(together.vision_inputs[key], tensor), key


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_rows_prepared_together_are_the_rows_prepared_alone(family, targets, world):
    target = targets[family]
    processors = [target.processor]
    if family in ("qwen2_5_vl", "qwen3_vl"):  # transformers' own class too (ours stands in where torchvision is absent)
        processors.append(transformers_processor(family, world[family]["target"]))
    for processor in processors:
        check_processor(processor, target.context_length)


def check_processor(processor, context_length):
    assert any(cls.__name__ in BATCHED_PROCESSORS for cls in type(processor).__mro__)
    rows = tiny_models.sample_rows(23)  # prompts of several lengths, images of several sizes, text-only rows
    two = [Image.new("RGB", (30, 20), (200, 40, 40)), Image.new("RGB", (18, 26), (40, 40, 200))]
    rows += [
        ("", rows[0][1]),  # empty prompt
        (f"what is {processor.tokenizer.eos_token} here", None),  # markup
        ("shape " * (context_length or 512), rows[0][1]),  # too long for the context
        ("Describe the image.", "not an image"),
        ("A speck?", Image.new("RGB", (1, 1), (9, 9, 9))),  # fails in some processors' call: its group's call too
        ("A thread?", Image.new("RGB", (3000, 2), (9, 9, 9))),
        ("Compare the two images.", two),
        ("And these two?", list(reversed(two))),
    ]
    alone = one_by_one(processor, context_length, rows)
    assert sum(isinstance(r, Exception) for r in alone) >= 4
    side = processor.tokenizer.padding_side
    try:
        for processor.tokenizer.padding_side in ("right", "left"):  # checkpoints pad on either side
            for t, a in zip(prepare_prompts(processor, rows, context_length), alone, strict=True):
                assert_same(t, a)
    finally:
        processor.tokenizer.padding_side = side

    # the image rows did share one call (a group whose call fails falls back to one call a row, silently)
    specials = special_token_texts(processor)
    members = [(i, *_templated(processor, specials, p, im)) for i, (p, im) in enumerate(rows[:10]) if im is not None]
    shared = _prepared_together(processor, members, 1)
    assert shared is not None and len(shared) == len(members) > 1
    for prepared, (i, _, _) in zip(shared, members):
        assert_same(prepared, alone[i])
