"""The fused stacks compute the model's own logits (same rows, ragged appends and rollbacks, per family): the fused
drafter forward (its prefill too) up to rounding, the exact target forward bit for bit (at batch 1 as HF's own forward
runs it, without a mask)."""

import pytest
import torch

from pipeline.engine.decoder import RaggedDecoder
from pipeline.engine.fused import EXACT, FUSED, HF_FORWARD
from pipeline.lab.tiny_models import CAUSAL_LMS

LLAMA_ARCHITECTURE = ["llava", "qwen2_5_vl", "qwen3_vl"]  # the drafter LMs of these targets: Llama, Qwen2, Qwen3
EXACT_ARCHITECTURES = [*LLAMA_ARCHITECTURE, "gemma3"]  # Gemma3's sandwich norms, local and global rotary: exact only


def _language_model(target_family: str, seed: int = 0):
    torch.manual_seed(seed)
    model_class, make_config = CAUSAL_LMS[target_family]
    model = model_class(make_config(96, 32, 2, 0.2)).eval()
    if target_family == "qwen2_5_vl":  # Qwen2 has q/k/v biases; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


def _decode(decoder: RaggedDecoder, prompts: list[list[int]], first_position: int = 0) -> list[torch.Tensor]:
    """Logits of a ragged prefill (each row's last token), then of steps appending 1 and 3 tokens (rows keeping fewer)
    and a rollback."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    positions = (mask.cumsum(1) - 1).clamp_min(0) + first_position
    logits = [decoder.prefill(mask, positions, torch.full((len(prompts),), first_position), input_ids=ids).logits]
    logits.append(decoder.forward(input_ids=torch.tensor([[5], [7], [9]])).logits)
    logits.append(decoder.forward(input_ids=torch.tensor([[11, 12, 13]] * 3), num_new=torch.tensor([3, 1, 2])).logits)
    decoder.rollback(torch.tensor([1, 0, 2]))
    logits.append(decoder.forward(input_ids=torch.tensor([[20, 21]] * 3)).logits)
    return logits


@pytest.mark.parametrize("family", LLAMA_ARCHITECTURE)
def test_fused_logits_equal_the_models_own(family):
    model = _language_model(family)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    fused = RaggedDecoder(model, stack=FUSED)
    assert fused.fused_stack is not None
    q_proj, stacked = model.model.layers[0].self_attn.q_proj, fused.fused_stack.layers[0].qkv.weight
    assert q_proj.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()  # one copy
    for ours, hf in zip(_decode(fused, prompts), _decode(RaggedDecoder(model, stack=HF_FORWARD), prompts), strict=True):
        torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.argmax(-1), hf.argmax(-1))


def test_a_base_model_gives_its_last_hidden_states():  # an MSD head: features, no output head
    model = _language_model("llava").model
    fused, hf = RaggedDecoder(model, stack=FUSED), RaggedDecoder(model, stack=HF_FORWARD)
    assert fused.fused_stack is not None and fused.fused_stack.head is None
    for decoder in (fused, hf):
        decoder.prefill(torch.ones(2, 5, dtype=torch.long), torch.arange(5).expand(2, 5),
                        torch.zeros(2, dtype=torch.long), input_ids=torch.tensor([[3, 4, 5, 6, 7], [6, 7, 8, 9, 10]]))
    ours = fused.forward(inputs_embeds=torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(0)))
    theirs = hf.forward(inputs_embeds=torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", EXACT_ARCHITECTURES)
def test_exact_logits_are_the_models_own_bit_for_bit(family):
    """Grouped heads (4 query heads, 2 key/value), biases (Qwen2), q/k norms (Qwen3, Gemma3), Gemma3's sandwich norms,
    scaled embeddings and sliding-window layers (a window of 8, passed); one and several tokens."""
    model = _language_model(family)
    model.config._attn_implementation = "sdpa"  # as Target.load asks
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    exact = RaggedDecoder(model)
    assert exact.fused_stack is not None and exact.fused_stack.head is not None
    hf = _decode(RaggedDecoder(model, stack=HF_FORWARD), prompts)
    for ours, theirs in zip(_decode(exact, prompts), hf, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", EXACT_ARCHITECTURES)
def test_one_rows_one_token_runs_without_a_mask_as_hfs_own_forward_does(family):
    """At batch 1 a token attends to every slot its row holds, so the stacks run it without a mask, as HF's own forward
    does (generate at batch 1): the exact stack gives its logits bit for bit, before and after a rollback leaves stale
    slots past the row's end (HF's cache cropped instead). Gemma3's sliding-window layers get a mask once the row
    reaches their window (8 slots, the last step), as HF's do, its full-attention layers none. (Past the window HF's
    cache keeps the window's slots alone, where ours keeps the row and masks the rest: the same keys, summed over
    more slots, equal up to rounding.)"""
    from transformers import DynamicCache

    model = _language_model(family)
    model.config._attn_implementation = "sdpa"
    prompt, tokens = [3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        hf = [model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits for t in tokens[:3]]
        cache.crop(-2)  # the last two steps rolled back
        hf += [model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits for t in tokens[3:]]
    for stack in (EXACT, FUSED):
        decoder = RaggedDecoder(model, stack=stack)
        decoder.prefill(torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None], torch.zeros(1, dtype=torch.long),
                        input_ids=torch.tensor([prompt]))
        ours = [decoder.forward(input_ids=torch.tensor([[t]])).logits for t in tokens[:3]]
        decoder.rollback(torch.tensor([2]))
        ours += [decoder.forward(input_ids=torch.tensor([[t]])).logits for t in tokens[3:]]
        for mine, theirs in zip(ours, hf, strict=True):
            if stack == EXACT:
                assert torch.equal(mine, theirs)
            else:
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", LLAMA_ARCHITECTURE)
def test_the_exact_stack_norms_through_torch_only_where_it_gives_the_modules_numbers(family):
    """In float32 on a CPU the exact stack applies its RMSNorms (Qwen3's q/k norms too) through torch's rms_norm, one
    call: the module's numbers bit for bit at any width and scale; in bfloat16, whose roundings differ, the module's
    own forward."""
    from pipeline.engine.fused import _exact_norm, _Norm

    model = _language_model(family)
    layer = model.model.layers[0]
    norms = [layer.input_layernorm, *([layer.self_attn.q_norm] if hasattr(layer.self_attn, "q_norm") else [])]
    generator = torch.Generator().manual_seed(1)
    for norm in norms:
        torch.nn.init.normal_(norm.weight, generator=generator)
        applied = _exact_norm(norm)
        assert isinstance(applied, _Norm)
        for shape, scale in (((1, 1), 1e-3), ((3, 7), 1.0), ((32, 6), 50.0)):
            x = torch.randn(*shape, norm.weight.shape[0], generator=generator) * scale
            assert torch.equal(applied(x), norm(x))
        assert _exact_norm(norm.to(torch.bfloat16)) == norm.forward


def test_the_rotary_table_grows_with_the_positions_and_keeps_the_models_numbers():
    """cos and sin are read from a table of the rotary embedding's own values, grown when positions pass its end."""
    model = _language_model("llava")
    model.config._attn_implementation = "sdpa"
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    exact, hf = RaggedDecoder(model), RaggedDecoder(model, stack=HF_FORWARD)
    for first_position in (0, 700, 5):  # a table of 256 positions, then grown past 700
        for ours, theirs in zip(_decode(exact, prompts, first_position), _decode(hf, prompts, first_position)):
            assert torch.equal(ours, theirs)
    assert exact.fused_stack.rotary_tables[None][0].shape[0] > 700


@pytest.mark.parametrize("family", EXACT_ARCHITECTURES)
def test_a_target_decodes_through_the_exact_stack_with_hf_numbers(targets, family):
    """LLaVA's Llama, the Qwen-VL language models (M-RoPE positions included) and Gemma3's."""
    target = targets[family]
    assert target.decoder.fused_stack is not None  # the language model's layers, no module calls
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    exact, hf = RaggedDecoder(target.model, target.family), RaggedDecoder(target.model, target.family, HF_FORWARD)
    for ours, theirs in zip(_decode(exact, prompts), _decode(hf, prompts), strict=True):
        assert torch.equal(ours, theirs)
    for decoder in (exact, hf):  # what an MSD drafter reads: the last hidden states, after the final norm
        decoder.forward(input_ids=torch.tensor([[30], [31], [32]]))
    ours, theirs = (d.forward(input_ids=torch.tensor([[33], [34], [35]]), hidden_states=True) for d in (exact, hf))
    assert torch.equal(ours.hidden_states[-1], theirs.hidden_states[-1])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_a_targets_prefill_over_embeddings_runs_the_exact_stack_with_hf_numbers(targets, family):
    """LLaVA's and Qwen2.5-VL's prefill forward is the language model over the prompt's embeddings (the images filled
    in): the exact stack runs it on the same left-padded batch with HF's mask, giving HF's logits, last hidden states
    and cache bit for bit (the decode steps after it read that cache); M-RoPE positions included. (Qwen3-VL's, with
    its DeepStack features: test_qwen_families.py.)"""
    target = targets[family]
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    if family == "qwen2_5_vl":  # [3, B, L]: as an image's grid does, height and width run ahead of time here
        positions = torch.stack([positions, positions + 2 * mask, positions + 3 * mask])
    noise = torch.randn(3, width, 1, generator=torch.Generator().manual_seed(0))  # as image features would differ
    embeds = target.model.get_input_embeddings()(ids) + noise
    exact, hf = RaggedDecoder(target.model, target.family), RaggedDecoder(target.model, target.family, HF_FORWARD)
    assert exact.exact_prefill and not hf.exact_prefill
    outputs = []
    for decoder in (exact, hf):
        offsets = torch.tensor([3, 3, 3]) if family == "qwen2_5_vl" else torch.zeros(3, dtype=torch.long)
        prefill = decoder.prefill(mask, positions, offsets, hidden_states=True, inputs_embeds=embeds)
        step = decoder.forward(input_ids=torch.tensor([[30, 31], [32, 33], [34, 35]]), hidden_states=True)
        outputs.append([prefill.logits, prefill.hidden_states[-1], step.logits, step.hidden_states[-1]])
    for ours, theirs in zip(*outputs, strict=True):
        assert torch.equal(ours, theirs)


def test_gemma3s_layers_run_exact_for_either_kind(targets):
    """Its sandwich norms have no fused layer: a Gemma3 MSD head's stack runs the exact one, HF's numbers (what it
    saves is the module calls), its prefill through it too."""
    gemma3 = _language_model("gemma3")
    gemma3.config._attn_implementation = "sdpa"
    assert targets["gemma3"].decoder.fused_stack is not None
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    fused = RaggedDecoder(gemma3, stack=FUSED)
    assert fused.fused_prefill
    for ours, theirs in zip(_decode(fused, prompts), _decode(RaggedDecoder(gemma3, stack=HF_FORWARD), prompts)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
