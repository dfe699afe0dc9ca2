"""A KV cache for batched speculative decoding: right-padded, hole-free rows, rollback by lengths.

Row i's keys and values occupy cache slots [0, length_i), so every row is
contiguous (no masked holes: sliding-window layers count slots, see DESIGN.md).
A forward of q tokens per row writes them at slots [length_i, length_i + q) and
appends them (`end_forward(num_new)`: all q, or fewer per row for right-padded
ragged input). `rollback(num_dropped)` discards each row's last tokens by
lowering its length: rejected drafts are never copied or recomputed, and the
next forward overwrites them.

Slot and position: a token's rotary position is its slot plus its row's
`position_offsets` entry: slot != position is allowed. One-axis families have
offset 0 (slot = position); M-RoPE families (Qwen2.5-VL, Qwen3-VL: positions from
an image-grid aware rope index, text after an image below its slot) continue each
row from its own offset, and so does a MASSV drafter that reads their positions.
Masks work on slots; positions only feed the rotary embedding (see families.py).

Rows under continuous batching: a buffer holds the keys and values of up to LAYERS_PER_STORE
layers and the rows of the largest batch so far; the live rows are the first B. A row that
joins is written into a spare row, and one that leaves hands its place to a live row from the
end, so neither copies the rows that stay (select_rows copies only the rows that move), and a
row moves in one copy per buffer.

Memory bound: the buffer holds at most max_i(length_i) + q + GROWTH_SLOTS slots per
row, where q <= gamma + 1 is the widest forward so far. Rejections do not grow it:
slots are reclaimed by lowering length_i. Sliding-window layers keep all history
(HF's cache evicts entries a rollback may need), and the attention mask limits
what each query sees.

Lengths live on the host (a CPU tensor): the engine reads accepted counts there
anyway, and it keeps the forward free of GPU synchronisations (kv_len is known
before the forward instead of read back from the device in every layer).

Attention masks are built here from per-row positions (HF builds masks from one
cache position shared by the whole batch, which ragged rows cannot use).
"""

from __future__ import annotations

import torch
from transformers import Cache

GROWTH_SLOTS = 64  # grow in chunks so the buffer is not copied on every step
# layers whose keys and values share a buffer: a row moves (continuous batching) in one copy per buffer, where two a
# layer cost the demo world's joins 3% of continuous batching's time; a buffer grows at once, old and new held for the
# copy (8 of a 32-layer model: a quarter of the cache more, where one buffer for all would double it)
LAYERS_PER_STORE = 8

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


class RaggedKVCache(Cache):
    """Every layer's keys and values, [B, heads, capacity, head_dim] each, with a length per row."""

    def __init__(self, num_layers: int, lengths: torch.Tensor, device: torch.device,
                 position_offsets: torch.Tensor | None = None):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.lengths = lengths.to("cpu", torch.long).clone()  # [B] committed slots per row, on the host
        # [B] rotary position minus slot, per row, on the host (0 for one-axis families)
        self._set_offsets(torch.zeros_like(self.lengths) if position_offsets is None
                          else position_offsets.to("cpu", torch.long).clone())
        # the keys and values of up to LAYERS_PER_STORE layers in one buffer [layers, 2 (keys, values), rows, heads,
        # capacity, head_dim], so that moving a row is one copy per store, not two a layer (see select_rows), while
        # growing a store holds an old and a new copy of that store alone; None until the cache has rows
        self.stores: list[torch.Tensor] | None = None
        self._write_slots: torch.Tensor | None = None  # [B, q] on device: slots of the forward in flight
        self._write_index, self._write_index_shape = None, None  # see _flat_write_index
        self._common_start: int | None = None  # the forward in flight's first slot, where every row's is the same
        self.kv_len = 0  # slots the forward in flight attends over: max_i(length_i) + q

    # ---- what the HF attention layers call ----
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # extras: rotary kwargs, unused
        """Write [B, heads, q, dim] states at each row's next q slots; return the cache up to the longest row."""
        slots = self._write_slots
        if slots is None or slots.shape[1] != key_states.shape[2]:
            raise RuntimeError("RaggedKVCache.begin_forward(q) must be called before a forward of q tokens")
        kv_len, rows = self.kv_len, len(self.lengths)
        if self.stores is None:
            self.stores = _new_stores(self.num_layers, key_states, rows, kv_len + GROWTH_SLOTS)
        group, layer = divmod(layer_idx, LAYERS_PER_STORE)
        if self.stores[group].shape[4] < kv_len:  # a store's layers grow at once, at its first layer's write
            self.stores[group] = _grow(self.stores[group], rows, kv_len + GROWTH_SLOTS)
        keys, values = self.stores[group][layer, :, :rows].unbind()  # views: the live rows
        start = self._common_start
        if start is not None:  # every row writes the same slots (batch 1; plain steps of rows of one length): a
            # slice's copy, not a scatter and its index (a target decode step of the demo world 0.93-0.99x the time),
            # nor an indexed copy
            keys[:, :, start:kv_len].copy_(key_states)
            values[:, :, start:kv_len].copy_(value_states)
        else:  # rows write different slots (ragged rows, as continuous batching and drafting steps make them)
            index = self._flat_write_index(keys.shape[1], keys.shape[2])
            dim = keys.shape[3]
            keys.view(-1, dim).index_copy_(0, index, key_states.reshape(-1, dim))
            values.view(-1, dim).index_copy_(0, index, value_states.reshape(-1, dim))
        return keys[:, :, :kv_len], values[:, :, :kv_len]

    def _flat_write_index(self, heads: int, capacity: int) -> torch.Tensor:
        """[B * heads * q]: where the forward in flight's states [B, heads, q, dim] go among the live rows' [B * heads *
        capacity] slot vectors, computed once a forward (per buffer shape). A copy of the states' slot vectors by it
        took half a scatter's time at 32 rows of the demo world's 2 heads of 32, a third at 8 heads of 128 (3.7 against
        6.9 us; 12.8 against 44.6), and the scatter's extra time was 4% of a plain step in continuous batching."""
        if self._write_index_shape != (heads, capacity):
            slots = self._write_slots  # [B, q]
            row_heads = torch.arange(len(slots) * heads, device=slots.device).view(-1, heads, 1)  # [B, heads, 1]
            self._write_index = (row_heads * capacity + slots[:, None, :]).reshape(-1)
            self._write_index_shape = (heads, capacity)
        return self._write_index

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    # ---- what the owner of the sequence state calls ----
    def begin_forward(self, q: int) -> torch.Tensor:
        """Reserve slots [length_i, length_i + q) per row; return them [B, q] on the device."""
        slots = self.lengths[:, None] + torch.arange(q)[None, :]
        lengths = self.lengths.tolist()
        shortest, longest = min(lengths, default=0), max(lengths, default=0)
        self.kv_len = longest + q
        self._common_start = longest if shortest == longest else None
        self._write_slots = slots.to(self.device, non_blocking=True)
        self._write_index_shape = None
        return self._write_slots

    @property
    def position_bound(self) -> int:
        """Every position of the forward in flight is below this (a rotary table that long covers them)."""
        return self.kv_len + self._max_offset

    def _set_offsets(self, offsets: torch.Tensor) -> None:
        self.position_offsets = offsets
        self._max_offset = int(offsets.max()) if len(offsets) else 0

    def end_forward(self, num_new: torch.Tensor | int) -> None:
        """Append the first num_new[i] tokens of the forward in flight to row i (host tensor; an int: all rows)."""
        self.lengths += num_new if isinstance(num_new, int) else num_new.to("cpu", torch.long)
        self._write_slots = None

    def rollback(self, num_dropped: torch.Tensor) -> None:
        """Discard the last num_dropped[i] tokens of row i (host tensor)."""
        self.lengths -= num_dropped.to("cpu", torch.long)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows, in this order (finished rows leave the batch). Rows already in place are not
        copied: keeping the first n rows copies nothing, and filling each leaver's place with a row from past the
        new end copies only those (the running batch removes rows that way)."""
        rows = rows.cpu()
        self.lengths = self.lengths[rows]
        self._set_offsets(self.position_offsets[rows])
        moves = moves_in_place(rows)
        if moves == [] or self.stores is None:
            return
        if moves is not None:
            if self.device.type == "cpu":  # row by row: a row's copy (a store's keys and values) is one strided copy,
                # where an indexed copy of the same rows took 4-5x as long (83 against 17 us for 2 rows of the demo
                # world's cache at batch 32, 238 against 57 for 6; with a buffer per layer, a copy a row and buffer took
                # 60 us for 2 rows; a row's committed slots alone, a strided copy, took longer than it all)
                for store in self.stores:
                    for place, row in moves:
                        store[:, :, place].copy_(store[:, :, row])
            else:  # an indexed copy per store: a gather and a scatter, however many rows move
                places, sources = (torch.tensor(side, device=self.device) for side in zip(*moves))
                for store in self.stores:
                    store[:, :, places] = store[:, :, sources]
        else:
            rows = rows.to(self.device)
            self.stores = [store[:, :, rows] for store in self.stores]

    def append_rows(self, other: RaggedKVCache, start: int = 0) -> None:
        """Add another cache's rows from `start` on after these: rows admitted into a running batch. They are
        written into the buffers' spare rows (rows that left the batch), so the running rows are not copied unless
        the buffers must grow: one copy per store (a copy of each layer's keys and values cost 95 us a join of the
        demo world's 4 layers, 3% of continuous batching's time; 46 us in one store)."""
        rows, new = len(self.lengths), len(other.lengths) - start
        self.lengths = torch.cat([self.lengths, other.lengths[start:]])
        self._set_offsets(torch.cat([self.position_offsets, other.position_offsets[start:]]))
        if other.stores is None:
            return
        if self.stores is None:  # a cache without rows yet
            self.stores = [store.new_zeros(store.shape[0], 2, 0, *store.shape[3:]) for store in other.stores]
        for i, incoming in enumerate(other.stores):
            states, store = incoming[:, :, start : start + new], self.stores[i]
            if store.shape[2] < rows + new or store.shape[4] < states.shape[4]:
                store = self.stores[i] = _grow(store, rows, max(store.shape[4], states.shape[4]), rows + new)
            store[:, :, rows : rows + new, :, : states.shape[4]] = states
            store[:, :, rows : rows + new, :, states.shape[4] :] = 0

    @classmethod
    def empty_like(cls, other: RaggedKVCache) -> RaggedKVCache:
        """A cache without rows, for the same model as `other` (rows join it through append_rows)."""
        return cls(other.num_layers, other.lengths[:0], other.device)

    @property
    def capacity(self) -> int:
        return max((store.shape[4] for store in self.stores), default=0) if self.stores is not None else 0

    @property
    def keys(self) -> list[torch.Tensor]:
        """Each layer's keys [rows, heads, capacity, head_dim] (views of its store: every row it holds, live or not)."""
        return [] if self.stores is None else [layer for store in self.stores for layer in store[:, 0]]

    @property
    def values(self) -> list[torch.Tensor]:
        return [] if self.stores is None else [layer for store in self.stores for layer in store[:, 1]]

    @classmethod
    def from_left_padded(cls, hf_cache: Cache, lengths: torch.Tensor, padded_len: int,
                         position_offsets: torch.Tensor | None = None) -> RaggedKVCache:
        """Convert HF's cache of a left-padded prefill into right-padded rows.

        Sliding-window layers of HF's cache may keep only the last n < padded_len
        slots; those are exactly the ones later queries can see.
        """
        layers = hf_cache.layers
        cache = cls(len(layers), lengths, layers[0].keys.device, position_offsets)
        cache.stores = _new_stores(len(layers), layers[0].keys, len(lengths), padded_len + GROWTH_SLOTS)
        # rows of one length move with one copy a layer (a gather of every slot cost 5.6 ms at batch 32 on the demo
        # world, 16% of a prefill; slices 0.16 ms); prompts of one template are often all of one length
        by_length: dict[int, list[int]] = {}
        for row, length in enumerate(cache.lengths.tolist()):
            by_length.setdefault(length, []).append(row)
        groups = [(length, None if len(rows) == len(cache.lengths) else torch.tensor(rows, device=cache.device))
                  for length, rows in by_length.items()]
        for i, layer in enumerate(layers):
            store = cache.stores[i // LAYERS_PER_STORE][i % LAYERS_PER_STORE]
            _right_align(layer.keys, groups, store[0])
            _right_align(layer.values, groups, store[1])
        return cache


def moves_in_place(rows: torch.Tensor) -> list[tuple[int, int]] | None:
    """The (place, row) copies that keep these rows (host indices), in this order, in a buffer of rows without
    copying the rows already in place: none when the first n are kept; one a leaver filled by a row from past the new
    end (how the running batch removes rows); None when a copy would overwrite a row a later one reads (gather them
    instead)."""
    moves = [(place, row) for place, row in enumerate(rows.tolist()) if place != row]
    return moves if all(row >= len(rows) for _, row in moves) else None


def _right_align(
    states: torch.Tensor,  # [B, H, n, D]: a left-padded prefill's last n slots (n < the padded length in a window)
    groups: list[tuple[int, torch.Tensor | None]],  # (length, its rows; None: every row)
    out: torch.Tensor,  # [B, H, capacity, D], zeros: gets each row's tokens from slot 0 on (padding may hold NaN)
) -> None:
    n = states.shape[2]
    for length, rows in groups:
        kept = min(length, n)  # a sliding window keeps only the last n slots: the ones later queries can see
        if rows is None:
            out[:, :, length - kept : length] = states[:, :, n - kept :]
        else:
            out[rows, :, length - kept : length] = states[rows, :, n - kept :]


def _new_stores(num_layers: int, states: torch.Tensor, rows: int, capacity: int) -> list[torch.Tensor]:
    """Zeros [layers, 2, rows, heads, capacity, head_dim], LAYERS_PER_STORE layers a store (the last one the rest), for
    layers whose states are shaped as `states` [B, heads, q, head_dim] (every layer of a supported model: one head
    count and head size)."""
    return [states.new_zeros(min(LAYERS_PER_STORE, num_layers - first), 2, rows, states.shape[1], capacity,
                             states.shape[3])
            for first in range(0, num_layers, LAYERS_PER_STORE)]


def _grow(store: torch.Tensor, rows: int, capacity: int, row_capacity: int | None = None) -> torch.Tensor:
    """A larger store holding the first `rows` rows of this one (the live ones)."""
    grown = store.new_zeros(*store.shape[:2], max(row_capacity or 0, store.shape[2]), store.shape[3], capacity,
                            store.shape[5])
    grown[:, :, :rows, :, : store.shape[4]] = store[:, :, :rows]
    return grown


def attention_masks(
    query_slots: torch.Tensor,  # [B, q] cache slot of each query token
    kv_len: int,
    layer_types: frozenset[str],
    sliding_window: int | None,
    dtype: torch.dtype,
    one_token_of_one_row: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor | None] | None:  # [B, 1, q, kv_len] additive, or one per layer type
    """Causal (and sliding-window) masks over right-padded rows, by cache slot.

    Additive float masks work with both the sdpa and eager attention paths. Models
    with one layer type take a tensor; hybrid models (Gemma3) take a dict keyed by
    layer type, which HF passes through untouched. one_token_of_one_row: a query that
    sees every slot of its row gets no mask (None), as HF's own forward passes none
    there (generate at batch 1): full attention always, a sliding window while the
    row is shorter than the window.
    """
    def build(window: int | None) -> torch.Tensor:
        slots = torch.arange(kv_len, device=query_slots.device)[None, None, :]  # [1, 1, kv]
        query = query_slots[:, :, None]  # [B, q, 1]
        allowed = slots <= query
        if window is not None:
            allowed &= slots > query - window
        return torch.zeros(allowed.shape, dtype=dtype, device=query_slots.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[:, None]

    sees_all = {FULL_ATTENTION: one_token_of_one_row,
                SLIDING_ATTENTION: one_token_of_one_row and sliding_window is not None and kv_len < sliding_window}
    masks = {t: None if sees_all[t] else build(sliding_window if t == SLIDING_ATTENTION else None) for t in layer_types}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return masks


def layer_types_of(text_config) -> tuple[frozenset[str], int | None]:
    """The attention layer types of a decoder config and its sliding window (if any)."""
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None)
    if types:
        kinds = frozenset(types)
    else:
        kinds = frozenset({SLIDING_ATTENTION if window else FULL_ATTENTION})
    unknown = kinds - {FULL_ATTENTION, SLIDING_ATTENTION}
    if unknown:
        raise ValueError(f"unsupported attention layer types {sorted(unknown)}: only full and sliding attention")
    return kinds, (window if SLIDING_ATTENTION in kinds else None)
