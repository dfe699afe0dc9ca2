"""The ragged KV cache: masks from per-row positions, conversion from a left-padded prefill, rollback by lengths."""

import torch
from transformers import DynamicCache

from pipeline.engine.kv_cache import GROWTH_SLOTS, LAYERS_PER_STORE, RaggedKVCache, attention_masks, layer_types_of


def allowed(mask):
    return (mask == 0).squeeze(1)


def test_causal_and_sliding_masks_follow_each_rows_position():
    positions = torch.tensor([[2, 3], [5, 6]])
    masks = attention_masks(positions, 7, frozenset({"full_attention", "sliding_attention"}), 3, torch.float32)
    full, sliding = allowed(masks["full_attention"]), allowed(masks["sliding_attention"])
    assert full[0, 0].tolist() == [True, True, True, False, False, False, False]
    assert full[1, 1].tolist() == [True] * 7
    assert sliding[1, 1].tolist() == [False, False, False, False, True, True, True]  # window of 3 ending at 6
    assert sliding[0, 0].tolist() == [True, True, True, False, False, False, False]


def test_single_layer_type_gives_a_tensor():
    class Cfg:
        pass

    kinds, window = layer_types_of(Cfg())
    assert kinds == frozenset({"full_attention"}) and window is None
    assert isinstance(attention_masks(torch.tensor([[0]]), 1, kinds, window, torch.float32), torch.Tensor)


def test_left_padded_prefill_becomes_right_padded_rows():
    hf = DynamicCache()
    keys = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 1, 5, 1)
    hf.update(keys, keys.clone(), 0)
    cache = RaggedKVCache.from_left_padded(hf, torch.tensor([5, 2]), padded_len=5)
    assert cache.keys[0].shape[2] == 5 + GROWTH_SLOTS
    assert cache.keys[0][0, 0, :5, 0].tolist() == [0, 1, 2, 3, 4]
    assert cache.keys[1 - 1][1, 0, :5, 0].tolist() == [8, 9, 0, 0, 0]  # row 1 was padded on the left


def test_rejected_slots_are_overwritten_not_kept():
    cache = RaggedKVCache(num_layers=1, lengths=torch.tensor([2, 4]), device="cpu")
    for step in range(50):
        positions = cache.begin_forward(4)
        states = positions[:, None, :, None].float().expand(2, 1, 4, 1)
        k, _ = cache.update(states, states, 0)
        assert k.shape[2] == int(positions.max()) + 1
        cache.end_forward(torch.tensor([4, 4]))
        cache.rollback(torch.tensor([3, 2]))  # keep 1 and 2 of the 4 tokens written
    assert cache.lengths.tolist() == [52, 104]
    # Capacity follows the longest row plus one forward, not the number of slots ever written.
    assert cache.capacity <= 104 + 4 + GROWTH_SLOTS
    # Slot t holds position t for every kept token.
    assert cache.keys[0][1, 0, :104, 0].tolist()[4:] == [float(t) for t in range(4, 104)]
    cache.rollback(torch.tensor([2, 0]))
    assert cache.lengths.tolist() == [50, 104]
    cache.select_rows(torch.tensor([1]))
    assert cache.lengths.tolist() == [104]
    assert cache.keys[0][0, 0, :104, 0].tolist()[4:] == [float(t) for t in range(4, 104)]


def test_rows_of_one_length_write_one_slice_and_ragged_rows_an_indexed_copy_alike():
    """A forward whose rows all start at one slot (batch 1, plain steps of rows of one length) writes its states as
    one slice; ragged rows write through an indexed copy; as rows move from one to the other, slot t holds position
    t in every layer, head and channel (layer l, head h, channel c: t + 1000 l + 100 h + 10 c), keys and values
    apart (values negated), across the buffers that hold the layers; and a row that moves, every layer of it."""
    layers = LAYERS_PER_STORE + 2  # two buffers
    cache = RaggedKVCache(num_layers=layers, lengths=torch.tensor([3, 3, 3]), device="cpu")
    marks = 100 * torch.arange(2)[None, :, None, None] + 10 * torch.arange(3)[None, None, None, :]  # [1, heads, 1, dim]
    row_marks = torch.tensor([0, 0, 1])[:, None, None, None] * 0.5  # row 2's states apart from row 0's
    for kept in ([2, 2, 2], [1, 3, 2], [2, 0, 1], [3, 3, 3]):  # equal lengths, ragged, equal again
        positions = cache.begin_forward(3)
        assert (cache._common_start is not None) == (len(set(cache.lengths.tolist())) == 1)
        for layer in range(layers):
            states = positions[:, None, :, None] + marks + 1000 * layer + row_marks  # [rows, 2 heads, q, 3 channels]
            cache.update(states.float(), -states.float(), layer)
        cache.end_forward(3)
        cache.rollback(3 - torch.tensor(kept))
    assert cache.lengths.tolist() == [11, 11, 11]

    def expect(rows):
        written = (torch.arange(3, 11)[None, None, :, None] + marks).float() + row_marks[rows]
        for layer in range(layers):
            assert torch.equal(cache.keys[layer][: len(rows), :, 3:11], written + 1000 * layer)
            assert torch.equal(cache.values[layer][: len(rows), :, 3:11], -written - 1000 * layer)

    expect([0, 1, 2])
    cache.select_rows(torch.tensor([2, 1]))  # row 0 leaves, row 2 takes its place in every buffer
    expect([2, 1])
    staged = RaggedKVCache(num_layers=layers, lengths=torch.tensor([3]), device="cpu")  # a row prefilled ahead, longer
    positions = staged.begin_forward(100)  # than the cache holds: the buffers grow as it joins
    for layer in range(layers):
        states = positions[:, None, :, None] + marks + 1000 * layer + 0.25
        staged.update(states.float(), -states.float(), layer)
    staged.end_forward(100)
    cache.append_rows(staged)
    assert cache.lengths.tolist() == [11, 11, 103] and cache.capacity >= 103
    expect([2, 1])  # the running rows as they were
    for layer in range(layers):
        joined = (torch.arange(3, 103)[None, :, None] + marks[0] + 1000 * layer + 0.25).float()
        assert torch.equal(cache.keys[layer][2, :, 3:103], joined)
        assert torch.equal(cache.values[layer][2, :, 3:103], -joined)


def filled(lengths: list[int], first: float) -> RaggedKVCache:
    """A one-layer cache whose row i holds first + i at the 3 slots after its length."""
    cache = RaggedKVCache(num_layers=1, lengths=torch.tensor(lengths), device="cpu")
    cache.begin_forward(3)
    states = (first + torch.arange(len(lengths)))[:, None, None, None].expand(-1, 1, 3, 1).float()
    cache.update(states, states.clone(), 0)
    cache.end_forward(3)
    return cache


def test_rows_leave_and_join_without_copying_the_running_rows():
    """Continuous batching: a leaver's place goes to a row from the end (only that row is copied), and admitted
    rows are written into the spare rows of the same buffers, so the running rows stay where they are."""
    cache = filled([0, 0, 0], first=10.0)  # rows hold 10, 11, 12 at their 3 slots
    store, buffer = cache.stores[0], cache.keys[0]
    cache.select_rows(torch.tensor([2, 1]))  # row 0 leaves; row 2 takes its place
    assert cache.stores[0] is store and buffer[0, 0, :3, 0].tolist() == [12.0] * 3
    assert buffer[1, 0, :3, 0].tolist() == [11.0] * 3
    cache.append_rows(filled([0], first=20.0))  # a row joins in the spare row
    assert cache.stores[0] is store and cache.lengths.tolist() == [3, 3, 3]
    assert [buffer[i, 0, :3, 0].tolist() for i in range(3)] == [[12.0] * 3, [11.0] * 3, [20.0] * 3]
    cache.begin_forward(1)
    keys, _ = cache.update(torch.zeros(3, 1, 1, 1), torch.zeros(3, 1, 1, 1), 0)
    assert keys.shape[0] == 3 and keys.data_ptr() == buffer.data_ptr()  # the next forward reads them in place


def test_staged_rows_move_from_the_end_of_their_cache():
    """Rows prefilled ahead join from the end of the staging cache: those that stay behind are not copied, and a
    cache without rows yet takes them as well as one with rows."""
    staged = filled([0, 0, 0, 0], first=30.0)
    staged_store, staged_buffer = staged.stores[0], staged.keys[0]
    running = RaggedKVCache.empty_like(staged)
    running.append_rows(staged, start=3)  # the last row joins an empty batch
    staged.select_rows(torch.arange(3))
    assert running.lengths.tolist() == [3] and running.keys[0][0, 0, :3, 0].tolist() == [33.0] * 3
    running.append_rows(staged, start=1)  # then two more, after it
    staged.select_rows(torch.arange(1))
    assert running.lengths.tolist() == [3, 3, 3]
    assert [running.keys[0][i, 0, :3, 0].tolist() for i in range(3)] == [[33.0] * 3, [31.0] * 3, [32.0] * 3]
    assert staged.stores[0] is staged_store and staged.lengths.tolist() == [3]
    assert staged_buffer[0, 0, :3, 0].tolist() == [30.0] * 3
