"""Target loading: device and dtype choice, and targets the engine cannot run are refused before any work."""

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

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
