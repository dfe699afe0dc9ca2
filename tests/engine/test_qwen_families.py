"""Qwen2.5-VL and Qwen3-VL targets: M-RoPE positions and DeepStack in the ragged engine, lossless.

The tiny checkpoints use the real HF classes (windowed ViT with patch merging, M-RoPE,
Qwen3-VL's interleaved M-RoPE and DeepStack); image sizes differ per row, so grids and
image-token counts do too. Drafters that are really accepted ("massv-noisy": the target's
own language model with a noisy head, reading the target's text-axis positions) exercise
rollback; every output is compared row by row with HF generate. Greedy fidelity at every gamma and batch size
with each drafter kind runs for every family in test_engine_fidelity.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import MAX_NEW, hf_greedy, prepare_rows, ragged_rows
from test_engine_fidelity import (
    assert_accepted_and_rejected,
    assert_first_tokens_follow_the_target,
    assert_same_tokens,
    total,
)
from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor

from drafters import load_drafter
from pipeline.engine.acceptance import SamplingConfig
from pipeline.engine.decoder import RaggedDecoder
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.families import MultiAxisRopeFamily
from pipeline.engine.fused import HF_FORWARD
from pipeline.engine.processors import QwenVLImageProcessor, load_processor, torchvision_imports
from pipeline.engine.prompts import build_messages
from pipeline.engine.target import Target

QWEN = ["qwen2_5_vl", "qwen3_vl"]
PROCESSOR_CLASSES = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}


def transformers_processor(family: str, path):
    """transformers' own processor class over the checkpoint's tokenizer and image processor. Its constructor
    checks the (absent) video processor's class, which needs torchvision: that one check is skipped here."""
    ours = QwenVLImageProcessor.from_pretrained(str(path))

    class WithoutVideo(PROCESSOR_CLASSES[family]):
        def check_argument_for_proper_class(self, name, argument):
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    return WithoutVideo(image_processor=ours.image_processor, tokenizer=ours.tokenizer, video_processor=None,
                        chat_template=ours.chat_template)


@pytest.mark.parametrize("family", QWEN)
def test_processor_without_torchvision_matches_transformers(world, family, caplog):
    path = world[family]["target"]
    if not torchvision_imports():  # the user path: AutoProcessor fails, one log line says what is used instead
        with caplog.at_level(logging.WARNING, logger="pipeline.engine.processors"):
            assert isinstance(load_processor(str(path)), QwenVLImageProcessor)
        assert len(caplog.records) == 1 and "without torchvision" in caplog.records[0].getMessage()
    ours = QwenVLImageProcessor.from_pretrained(str(path))
    references = [transformers_processor(family, path)]
    try:  # the real AutoProcessor, where this install can build it (torchvision present)
        from transformers import AutoProcessor
        references.append(AutoProcessor.from_pretrained(path))
    except ImportError:
        pass
    (prompt, small), (_, large), _ = ragged_rows(3)
    cases = [(prompt, [small]), ("Compare the two.", [small, large]), ("No image here.", [])]
    for reference in references:
        for text, images in cases:
            messages = build_messages(text, len(images))
            chat = ours.apply_chat_template(messages, add_generation_prompt=True)
            assert chat == reference.apply_chat_template(messages, add_generation_prompt=True)
            got = ours(text=[chat], images=[images] if images else None, return_tensors="pt")
            expected = reference(text=[chat], images=[images] if images else None, return_tensors="pt")
            assert sorted(got) == sorted(expected)
            for name in expected:
                assert torch.equal(got[name], expected[name]), (text, name)


def test_image_grids_and_token_counts_differ_per_row(targets, references):
    target = targets["qwen2_5_vl"]
    prompts, _ = references["qwen2_5_vl"]
    counts = [p.input_ids.count(target.image_token_id) for p in prompts]
    grids = {tuple(p.vision_inputs["image_grid_thw"][0].tolist()) for p in prompts if p.vision_inputs}
    assert 0 in counts and len(set(counts) - {0}) >= 4 and len(grids) >= 4, (counts, grids)


@pytest.mark.parametrize("family", QWEN)
def test_prefill_through_the_exact_stack_is_hfs_over_ids_and_encoder_outputs(targets, references, family):
    """A Qwen-VL target's prefill runs its exact stack over the prompt's embeddings with the image features filled in
    (Qwen3-VL's DeepStack features added after its first layers, as HF's text model adds them): the same logits,
    last hidden states, positions and cache, bit for bit, as HF's forward given the ids and the image encoder's
    outputs, on rows with images of different sizes and without."""
    target = targets[family]
    prompts, _ = references[family]
    assert target.decoder.exact_prefill and target.family.deepstack == (family == "qwen3_vl")
    by_ids = Target(target.model, target.processor, family=MultiAxisRopeFamily(deepstack=True))
    by_ids.decoder = RaggedDecoder(target.model, by_ids.family, HF_FORWARD)
    ours, hfs = (t.prefill(prompts, hidden_states=True) for t in (target, by_ids))
    assert torch.equal(ours.first_logits, hfs.first_logits) and torch.equal(ours.hidden_states, hfs.hidden_states)
    assert ours.positions == hfs.positions and torch.equal(ours.image_features, hfs.image_features)
    steps = [t.decoder.forward(input_ids=torch.arange(len(prompts))[:, None] + 5).logits for t in (target, by_ids)]
    assert torch.equal(*steps)  # the caches the prefills left


@pytest.mark.parametrize("family", QWEN)
def test_continuous_batching_is_token_identical(world, targets, references, family):
    """Rows admitted as others finish continue from their own rope offsets, target and drafter alike."""
    target = targets[family]
    prompts, expected = references[family]
    budgets = [MAX_NEW - 3 * (i % 5) for i in range(len(prompts))]
    drafter = load_drafter(world[family]["massv-noisy"], target)
    engine = SpecDecodeEngine(target, drafter, EngineConfig(gamma=3, max_new_tokens=MAX_NEW))
    results = engine.generate(prompts, max_new_tokens=budgets, max_batch_size=4)
    assert_same_tokens(target, prompts, [r.tokens for r in results], [e[:b] for e, b in zip(expected, budgets)])
    assert 3 <= engine.times.mean_rows_per_step <= 4
    assert_accepted_and_rejected(results)


@pytest.mark.parametrize("family", QWEN)
def test_rows_with_two_images_and_without_any(world, targets, family):
    target = targets[family]
    (prompt, image), (_, other) = ragged_rows(2)
    rows = prepare_rows(target, [(prompt, [image, other]), ("Describe the image.", other), ("hi", None)])
    assert rows[0].vision_inputs["image_grid_thw"].shape[0] == 2 and not rows[2].vision_inputs
    drafter = load_drafter(world[family]["massv-noisy"], target)
    results = SpecDecodeEngine(target, drafter, EngineConfig(gamma=3, max_new_tokens=MAX_NEW)).generate(rows)
    assert_same_tokens(target, rows, [r.tokens for r in results], [hf_greedy(target, p, MAX_NEW) for p in rows])


def test_drafters_that_read_the_targets_positions_are_accepted(world, targets, references):
    """The target's own language model as MASSV drafter reads each token at the target's text-axis position, so
    under M-RoPE it predicts Qwen2.5-VL exactly (Qwen3-VL adds DeepStack features the drafter does not see)."""
    taus = {}
    for family in QWEN:
        target = targets[family]
        prompts, expected = references[family]
        drafter = load_drafter(world[family]["massv-oracle"], target)
        results = SpecDecodeEngine(target, drafter, EngineConfig(gamma=3, max_new_tokens=MAX_NEW)).generate(prompts)
        assert [r.tokens for r in results] == expected
        taus[family] = total(results).mean_accepted_length
    assert taus["qwen2_5_vl"] > 3.8 and taus["qwen3_vl"] > 2.5, taus


def test_sampling_with_a_drafter_keeps_the_targets_distribution(world, targets):
    target = targets["qwen3_vl"]
    prompt = prepare_rows(target, ragged_rows(1))[0]
    drafter = load_drafter(world["qwen3_vl"]["massv-noisy"], target)
    assert_first_tokens_follow_the_target(target, drafter, prompt, rows=3000)
    config = EngineConfig(max_new_tokens=8, sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=7))
    prompts = prepare_rows(target, ragged_rows(3))
    first, again = (SpecDecodeEngine(target, drafter, config).generate(prompts) for _ in range(2))
    assert [r.tokens for r in first] == [r.tokens for r in again]
