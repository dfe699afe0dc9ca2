"""Drafter checkpoints: MASSV round trip through safetensors, and clear errors before decoding."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drafters import DRAFTER_CONFIG, LANGUAGE_MODEL_DIR, PROJECTOR_WEIGHTS, load_drafter
from pipeline.lab import tiny_models


def test_no_drafter(targets):
    assert load_drafter(None, targets["llava"]) is None
    assert load_drafter("none", targets["llava"]) is None


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_massv_directory_round_trip(world, targets, family):
    path = world[family]["massv"]
    assert json.loads((path / DRAFTER_CONFIG).read_text())["kind"] == "massv"
    assert (path / PROJECTOR_WEIGHTS).exists()
    assert list((path / LANGUAGE_MODEL_DIR).glob("*.safetensors"))
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # no pickles
    drafter = load_drafter(path, targets[family])
    assert drafter.kind == "massv"
    features = torch.randn(5, targets[family].text_config.hidden_size)
    assert drafter.model.projector(features).shape == (5, drafter.model.hidden_size)
    assert load_drafter(world[family]["text-only"], targets[family]).kind == "text-only"


def test_text_only_drafter_does_not_see_image_tokens(world, targets):
    target = targets["llava"]
    drafter = load_drafter(world["llava"]["text-only"], target)
    from conftest import prepare_rows, ragged_rows

    prompts = prepare_rows(target, ragged_rows(2))
    image_tokens = prompts[0].input_ids.count(target.image_token_id)
    assert image_tokens > 0
    drafter.prefill(prompts, target.prefill(prompts), torch.tensor([5, 6]))
    drafter.prefill_put_off()  # done by the engine before a step that drafts
    text_lengths = [len(p.input_ids) - p.input_ids.count(target.image_token_id) for p in prompts]
    assert drafter.decoder.ragged.lengths.tolist() == text_lengths
    assert drafter.decoder.ragged.cache.position_offsets.tolist() == [0, 0]  # its text numbered from 0, without gaps


def test_vocabulary_mismatch_is_refused_before_decoding(tmp_path, targets):
    target = targets["llava"]
    other = tiny_models.build_tokenizer(vocab_size=300, extra_corpus=("zebra zebra quokka",) * 50)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(other), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "foreign")
    other.save_pretrained(tmp_path / "foreign")
    with pytest.raises(ValueError, match="does not share the target's vocabulary: token .* use a drafter with"):
        load_drafter(tmp_path / "foreign", target)

    (tmp_path / "foreign" / "tokenizer.json").unlink()
    (tmp_path / "foreign" / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=f"vocabulary of {len(other)} tokens but the target has {target.vocab_size}"):
        load_drafter(tmp_path / "foreign", target)


def test_projector_for_another_target_is_refused(world, targets):
    with pytest.raises(ValueError, match="train the projector for this target"):
        # The gemma3 MASSV projector expects gemma3's features; the llava target's have another width.
        target = targets["llava"]
        original = target.text_config.hidden_size
        target.text_config.hidden_size = original + 1
        try:
            load_drafter(world["llava"]["massv"], target)
        finally:
            target.text_config.hidden_size = original



def test_training_numbers_tokens_as_the_target_does(world, targets):
    """MASSV training on an M-RoPE target reads each token at the target's text-axis position, as decoding does:
    the target's own language model as drafter then predicts the target's next answer token (but where image
    positions on the height and width axes tip a near-tie), far more often than when numbered sequentially."""
    import io

    from conftest import prepare_rows, ragged_rows

    from drafters.training import IGNORE, TrainConfig, build_draft_model, encode_batch

    target = targets["qwen2_5_vl"]
    config = TrainConfig(phase="distill", data="unused", target=str(world["qwen2_5_vl"]["target"]), output="unused",
                         drafter=str(world["qwen2_5_vl"]["massv-oracle"]))
    model = build_draft_model(config, target)
    images = ragged_rows(8, text_only_every=0)
    rows = []
    for prompt, image in images:
        data = io.BytesIO()
        image.save(data, format="PNG")
        rows.append({"prompt": prompt, "image": data.getvalue(), "answer": "the image shows a small red circle."})
    inputs = encode_batch(rows, config, target, model, torch.device("cpu"))
    labels = inputs.pop("labels")
    with torch.no_grad():
        drafted = model(**inputs).argmax(-1)
        sequential = model(**{**inputs, "position_ids": None}).argmax(-1)
    same = {"target positions": 0, "sequential": 0, "answer tokens": 0}
    for i, prompt in enumerate(prepare_rows(target, images)):
        answer = labels[i][labels[i] != IGNORE].tolist()
        ids = torch.tensor([prompt.input_ids + answer])
        types = torch.tensor([prompt.token_inputs["mm_token_type_ids"] + [0] * len(answer)])
        with torch.no_grad():
            expected = target.model(input_ids=ids, mm_token_type_ids=types, **prompt.vision_inputs).logits.argmax(-1)
        span = slice(len(prompt.input_ids) - 1, len(prompt.input_ids) - 1 + len(answer))  # predicting the answer
        same["target positions"] += int((drafted[i, span] == expected[0, span]).sum())
        same["sequential"] += int((sequential[i, span] == expected[0, span]).sum())
        same["answer tokens"] += len(answer)
    assert same["target positions"] >= 0.9 * same["answer tokens"] > same["sequential"], same


def test_msd_head_round_trip_stores_only_the_head(world, targets):
    """An MSD checkpoint is the head alone (fc + decoder layer, safetensors): embeddings and LM head are the
    target's, shared at load."""
    from safetensors import safe_open

    from drafters.msd import HEAD_WEIGHTS

    path = world["llava"]["msd"]
    config = json.loads((path / DRAFTER_CONFIG).read_text())
    target = targets["llava"]
    assert config["kind"] == "msd" and config["decoupled"] is True
    assert config["target"]["hidden_size"] == target.text_config.hidden_size
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # no pickles
    with safe_open(path / HEAD_WEIGHTS, "pt") as weights:
        names = list(weights.keys())
    assert "fc.weight" in names and any(".layers.0." in n for n in names)
    assert not any("embed" in n or "lm_head" in n for n in names), names
    drafter = load_drafter(path, target)
    assert drafter.kind == "msd" and drafter.reads_target_hidden_states
    assert drafter.model.shared[1] is target.model.get_output_embeddings()


def test_msd_head_for_another_target_is_refused(world, targets):
    """Loading checks shapes and a fingerprint of the shared weights: one sentence, before any decoding."""
    from drafters import check_drafter

    gemma3 = targets["gemma3"]  # the same width and vocabulary as the llava target, other weights
    with pytest.raises(ValueError, match=r"MSD head .* was trained for a target whose embeddings and LM head differ "
                                         r"from this target's \(fingerprint \w+, this target \w+\): train a head"):
        load_drafter(world["llava"]["msd"], gemma3)
    target = targets["llava"]
    text_config = target.text_config
    text_config.hidden_size += 1
    try:
        for refuse in (lambda: load_drafter(world["llava"]["msd"], target),
                       lambda: check_drafter(world["llava"]["msd"], target.tokenizer, text_config, "head")):
            with pytest.raises(ValueError, match="was trained for a target with hidden_size 64, but this target's is "
                                                 "65: train a head for this target"):
                refuse()
    finally:
        text_config.hidden_size -= 1


def test_msd_pending_pairs_append_in_place_and_come_out_ragged():
    """The pairs the head has not read: appended per row after its count (rejected slots, -1, never come out), rows
    selected and moved, then taken right-padded with 0."""
    from drafters.msd import PendingPairs

    def hidden(values):  # [B, q, 1]
        return torch.tensor(values, dtype=torch.float32)[..., None]

    pending = PendingPairs(hidden([[1.0], [2.0]]), torch.tensor([[1], [2]]), torch.tensor([1, 1]))
    pending.append(hidden([[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]]), torch.tensor([[3, 4, -1], [5, -1, -1]]),
                   torch.tensor([2, 1]))
    pending.append(hidden([[6.0], [7.0]]), torch.tensor([[6], [7]]), torch.tensor([1, 1]))
    extra = PendingPairs(hidden([[8.0]]), torch.tensor([[8]]), torch.tensor([1]))
    pending = pending.rows(torch.tensor([1, 0]))
    pending.extend(extra)
    states, tokens, counts = pending.take()
    assert counts.tolist() == [3, 4, 1]
    assert tokens.tolist() == [[2, 5, 7, 0], [1, 3, 4, 6], [8, 0, 0, 0]]
    assert states[0, :3, 0].tolist() == [2.0, 5.0, 7.0] and states[1, :4, 0].tolist() == [1.0, 3.0, 4.0, 6.0]
    pending.append(hidden([[9.0], [10.0], [11.0]]), torch.tensor([[9], [10], [11]]), torch.tensor([1, 1, 1]))
    assert pending.take()[1].tolist() == [[9], [10], [11]]  # taken pairs are gone


def test_msd_pending_pairs_leave_and_join_without_copying_the_rows_that_stay():
    """Continuous batching: a row that leaves hands its place to the last row (only that row is copied), rows that
    join go into the spare rows, and the buffers grow only when short; the pairs that come out are each row's own."""
    from drafters.msd import PendingPairs

    def pairs(values):  # one pair per row: hidden [B, 1, 1], tokens [B, 1]
        return PendingPairs(torch.tensor(values, dtype=torch.float32)[:, None, None],
                            torch.tensor(values)[:, None], torch.ones(len(values), dtype=torch.long))

    pending = pairs([1, 2, 3, 4])
    pending.append(torch.tensor([[[5.0]], [[6.0]], [[7.0]], [[8.0]]]), torch.tensor([[5], [6], [7], [8]]),
                   torch.tensor([1, 1, 1, 1]))
    pending.take()  # read: the buffers now hold 4 rows
    pending.append(torch.tensor([[[9.0, 0.0]], [[10.0, 11.0]], [[12.0, 0.0]], [[13.0, 14.0]]]).transpose(1, 2),
                   torch.tensor([[9, -1], [10, 11], [12, -1], [13, 14]]), torch.tensor([1, 2, 1, 2]))
    buffer = pending._tokens
    pending.select_rows(torch.tensor([0, 3, 2]))  # row 1 left: row 3 takes its place
    assert pending._tokens is buffer and pending.counts.tolist() == [1, 2, 1]
    pending.extend(pairs([20]))  # into the spare row
    assert pending._tokens is buffer and pending.counts.tolist() == [1, 2, 1, 1]
    pending.extend(pairs([30]))  # no spare row left: the buffers grow
    assert pending._tokens is not buffer and len(pending._tokens) >= 5
    states, tokens, counts = pending.take()
    assert counts.tolist() == [1, 2, 1, 1, 1]
    assert tokens.tolist() == [[9, 0], [13, 14], [12, 0], [20, 0], [30, 0]]
    assert states[:, 0, 0].tolist() == [9.0, 13.0, 12.0, 20.0, 30.0] and states[1, 1, 0] == 14.0
    pending.select_rows(torch.tensor([4, 1]))  # any other order: gathered
    pending.append(torch.tensor([[[40.0]], [[41.0]]]), torch.tensor([[40], [41]]), torch.tensor([1, 1]))
    assert pending.take()[1].tolist() == [[40], [41]]


def test_msd_pending_pairs_of_plain_steps_go_in_as_a_slice_and_agree_with_a_scatter():
    """Plain steps' pairs are queued and go in when next read: while every row holds as many pairs as one slice, after
    a step that kept different counts per row as one scatter for them all; the pairs that come out are the same."""
    from drafters.msd import PendingPairs

    pending = PendingPairs(torch.zeros(2, 1, 1), torch.tensor([[1], [2]]), torch.tensor([1, 1]))
    assert pending.level == 1
    pending.append(torch.ones(2, 1, 1), torch.tensor([[3], [4]]), torch.tensor([1, 1]))
    pending.append(torch.full((2, 1, 1), 2.0), torch.tensor([[5], [6]]), torch.tensor([1, 1]))
    pending.append(torch.ones(2, 2, 1), torch.tensor([[7, 8], [9, -1]]), torch.tensor([2, 1]))  # the queue goes first
    assert pending.level is None
    pending.append(torch.ones(2, 1, 1), torch.tensor([[10], [11]]), torch.tensor([1, 1]))
    pending.append(torch.full((2, 1, 1), 3.0), torch.tensor([[20], [21]]), torch.tensor([1, 1]))
    assert len(pending._queued) == 2  # plain steps after a ragged one: written together, when read
    states, tokens, counts = pending.take()
    assert counts.tolist() == [7, 6] and tokens.tolist() == [[1, 3, 5, 7, 8, 10, 20], [2, 4, 6, 9, 11, 21, 0]]
    assert states[:, :3, 0].tolist() == [[0.0, 1.0, 2.0]] * 2
    assert states[0, 5:7, 0].tolist() == [1.0, 3.0] and states[1, 4:6, 0].tolist() == [1.0, 3.0]
    assert pending.level == 0
    pending.append(torch.ones(2, 1, 1), torch.tensor([[12], [13]]), torch.tensor([1, 1]))
    pending.select_rows(torch.tensor([1]))  # rows leaving: what is queued is written first
    assert pending.take()[1].tolist() == [[13]] and pending.level == 0
