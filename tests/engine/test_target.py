"""Target loading: device and dtype choice, and targets the engine cannot run are refused before any work."""

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from pipeline.engine.families import ROTARY
from pipeline.engine.target import Target, pick_device


def test_cpu_runs_float32_and_loads_through_auto_classes(targets):
    device, dtype = pick_device()
    assert (device.type, dtype) == (("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32))
    for family, target in targets.items():
        assert target.model.dtype == dtype and target.device.type == device.type
        assert target.image_token_id is not None and target.eos_token_ids
        assert target.model.config.model_type == family


def test_untested_multi_axis_rotary_targets_are_refused_clearly(targets):
    config = Qwen2VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "vocab_size": 128},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32},
    )
    with pytest.raises(ValueError, match="multi-axis rotary positions .* supported multi-axis families are Qwen2.5-VL"):
        Target(Qwen2VLForConditionalGeneration(config), targets["llava"].processor)


def test_gemma3s_prefill_masks_are_the_ones_hfs_forward_builds(targets):
    """Gemma3's family builds its prefill masks (images attend within themselves both ways, on full and sliding
    layers) with tensor ops instead of HF's per-element mask functions: the same booleans, on ragged left-padded rows
    with one image, two, and none, the window (8 on the tiny target) shorter than the rows; the target's exact stack
    prefills with them."""
    from conftest import prepare_rows, ragged_rows
    from transformers.models.gemma3 import modeling_gemma3

    target = targets["gemma3"]
    (text, image), (_, other), (short, _) = ragged_rows(3)
    rows = prepare_rows(target, [(text, [image, other]), (short, other), ("hi", None), (text, image)])
    ids, mask, token_inputs, _ = target._padded(rows)
    assert int(token_inputs["token_type_ids"].sum()) > 0
    assert target.model.config.text_config.sliding_window < ids.shape[1]
    ours = target.family.prefill_masks(target.model, mask, token_inputs)
    hfs = modeling_gemma3.create_masks_for_vision_model(
        config=target.model.config.get_text_config(), inputs_embeds=target.model.get_input_embeddings()(ids),
        attention_mask=mask, cache=None, position_ids=None,
        block_sequence_ids=modeling_gemma3.get_block_sequence_ids_for_mask(token_inputs["token_type_ids"]))
    assert ours.keys() == hfs.keys()
    for kind in ours:
        assert ours[kind].dtype == hfs[kind].dtype == torch.bool and torch.equal(ours[kind], hfs[kind])
    # and the prefill with them, through the target's exact stack, is the one HF's forward runs with its own masks
    # (a family that builds none: LLaVA's), its logits, hidden states and cache (the decode step after it reads it)
    by_hf = Target(target.model, target.processor, family=ROTARY)
    with_ours, with_hfs = (t.prefill(rows, hidden_states=True) for t in (target, by_hf))
    assert torch.equal(with_ours.first_logits, with_hfs.first_logits)
    assert torch.equal(with_ours.hidden_states, with_hfs.hidden_states)
    steps = [t.verify(torch.arange(len(rows))[:, None] + 5)[0] for t in (target, by_hf)]
    assert torch.equal(*steps)
    # HF's eager attention adds float masks, not these: the family leaves its masks to HF's forward there
    text_config = target.model.config.get_text_config()
    text_config._attn_implementation = "eager"
    try:
        assert target.family.prefill_masks(target.model, mask, token_inputs) is None
    finally:
        text_config._attn_implementation = "sdpa"
