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

Rows under continuous batching: the buffers keep the rows of the largest batch so far;
the live rows are the first B. A row that joins is written into a spare row, and one
that leaves hands its place to a live row from the end, so neither copies the rows
that stay (select_rows copies only the rows that move).

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

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


class RaggedKVCache(Cache):
    """Per-layer [B, heads, capacity, head_dim] buffers with a length per row."""

    def __init__(self, num_layers: int, lengths: torch.Tensor, device: torch.device,
                 position_offsets: torch.Tensor | None = None):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.lengths = lengths.to("cpu", torch.long).clone()  # [B] committed slots per row, on the host
        # [B] rotary position minus slot, per row, on the host (0 for one-axis families)
        self._set_offsets(torch.zeros_like(self.lengths) if position_offsets is None
                          else position_offsets.to("cpu", torch.long).clone())
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._write_slots: torch.Tensor | None = None  # [B, q] on device: slots of the forward in flight
        self._common_start: int | None = None  # the forward in flight's first slot, where every row's is the same
        self.kv_len = 0  # slots the forward in flight attends over: max_i(length_i) + q

    # ---- what the HF attention layers call ----
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # extras: rotary kwargs, unused
        """Write [B, heads, q, dim] states at each row's next q slots; return the cache up to the longest row."""
        slots = self._write_slots
        if slots is None or slots.shape[1] != key_states.shape[2]:
            raise RuntimeError("RaggedKVCache.begin_forward(q) must be called before a forward of q tokens")
        kv_len, rows = self.kv_len, len(self.lengths)
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = _empty_like_rows(key_states, kv_len + GROWTH_SLOTS)
            self.values[layer_idx] = _empty_like_rows(value_states, kv_len + GROWTH_SLOTS)
        elif self.keys[layer_idx].shape[2] < kv_len:
            self.keys[layer_idx] = _grow(self.keys[layer_idx], rows, kv_len + GROWTH_SLOTS)
            self.values[layer_idx] = _grow(self.values[layer_idx], rows, kv_len + GROWTH_SLOTS)
        keys, values = self.keys[layer_idx][:rows], self.values[layer_idx][:rows]  # views: the live rows
        start = self._common_start
        if start is not None:  # every row writes the same slots (batch 1; plain steps of rows of one length): a
            # slice's copy, not a scatter and its index (a target decode step of the demo world 0.93-0.99x the time)
            keys[:, :, start:kv_len].copy_(key_states)
            values[:, :, start:kv_len].copy_(value_states)
        else:
            index = slots[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[3])
            keys.scatter_(2, index, key_states)
            values.scatter_(2, index, value_states)
        return keys[:, :, :kv_len], values[:, :, :kv_len]

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
        moves = [(place, row) for place, row in enumerate(rows.tolist()) if place != row]
        if not moves:
            return
        if all(row >= len(rows) for _, row in moves):  # in place: no source row is overwritten before it is read
            buffers = [buffer for buffer in [*self.keys, *self.values] if buffer is not None]
            if self.device.type == "cpu":  # row by row: a row's copy is one memcpy, where an indexed copy of the same
                # rows took twice as long (133 against 60 us for 2 rows of the demo world's 4-layer cache at batch
                # 32, 340 against 177 for 6; a row's committed slots alone, a strided copy, took longer than it all)
                for buffer in buffers:
                    for place, row in moves:
                        buffer[place].copy_(buffer[row])
            else:  # an indexed copy per buffer: a gather and a scatter, however many rows move
                places, sources = (torch.tensor(side, device=self.device) for side in zip(*moves))
                for buffer in buffers:
                    buffer[places] = buffer[sources]
        else:
            rows = rows.to(self.device)
            self.keys = [None if k is None else k[rows] for k in self.keys]
            self.values = [None if v is None else v[rows] for v in self.values]

    def append_rows(self, other: RaggedKVCache, start: int = 0) -> None:
        """Add another cache's rows from `start` on after these: rows admitted into a running batch. They are
        written into the buffers' spare rows (rows that left the batch), so the running rows are not copied unless
        the buffers must grow."""
        rows, new = len(self.lengths), len(other.lengths) - start
        self.lengths = torch.cat([self.lengths, other.lengths[start:]])
        self._set_offsets(torch.cat([self.position_offsets, other.position_offsets[start:]]))
        for buffers, incoming in ((self.keys, other.keys), (self.values, other.values)):
            for i, (buffer, states) in enumerate(zip(buffers, incoming)):
                if states is None:
                    continue
                states = states[start : start + new]
                if buffer is None:  # a cache without rows yet
                    buffer = buffers[i] = states.new_zeros(new, *states.shape[1:])
                if buffer.shape[0] < rows + new or buffer.shape[2] < states.shape[2]:
                    buffer = buffers[i] = _grow(buffer, rows, max(buffer.shape[2], states.shape[2]), rows + new)
                buffer[rows : rows + new, :, : states.shape[2]] = states
                buffer[rows : rows + new, :, states.shape[2] :] = 0

    @classmethod
    def empty_like(cls, other: RaggedKVCache) -> RaggedKVCache:
        """A cache without rows, for the same model as `other` (rows join it through append_rows)."""
        return cls(other.num_layers, other.lengths[:0], other.device)

    @property
    def capacity(self) -> int:
        return max((k.shape[2] for k in self.keys if k is not None), default=0)

    @classmethod
    def from_left_padded(cls, hf_cache: Cache, lengths: torch.Tensor, padded_len: int,
                         position_offsets: torch.Tensor | None = None) -> RaggedKVCache:
        """Convert HF's cache of a left-padded prefill into right-padded rows.

        Sliding-window layers of HF's cache may keep only the last n < padded_len
        slots; those are exactly the ones later queries can see.
        """
        layers = hf_cache.layers
        device = layers[0].keys.device
        cache = cls(len(layers), lengths, device, position_offsets)
        capacity = padded_len + GROWTH_SLOTS
        # rows of one length move with one copy a layer (a gather of every slot cost 5.6 ms at batch 32 on the demo
        # world, 16% of a prefill; slices 0.16 ms); prompts of one template are often all of one length
        by_length: dict[int, list[int]] = {}
        for row, length in enumerate(cache.lengths.tolist()):
            by_length.setdefault(length, []).append(row)
        groups = [(length, None if len(rows) == len(cache.lengths) else torch.tensor(rows, device=device))
                  for length, rows in by_length.items()]
        for i, layer in enumerate(layers):
            cache.keys[i] = _right_aligned(layer.keys, groups, capacity)
            cache.values[i] = _right_aligned(layer.values, groups, capacity)
        return cache


def _right_aligned(
    states: torch.Tensor,  # [B, H, n, D]: a left-padded prefill's last n slots (n < the padded length in a window)
    groups: list[tuple[int, torch.Tensor | None]],  # (length, its rows; None: every row)
    capacity: int,
) -> torch.Tensor:  # [B, H, capacity, D]: each row's tokens from slot 0 on, zeros after (padding may hold NaN)
    n = states.shape[2]
    out = _empty_like_rows(states, capacity)
    for length, rows in groups:
        kept = min(length, n)  # a sliding window keeps only the last n slots: the ones later queries can see
        if rows is None:
            out[:, :, length - kept : length] = states[:, :, n - kept :]
        else:
            out[rows, :, length - kept : length] = states[rows, :, n - kept :]
    return out


def _empty_like_rows(states: torch.Tensor, capacity: int) -> torch.Tensor:
    b, h, _, d = states.shape
    return states.new_zeros(b, h, capacity, d)


def _grow(buffer: torch.Tensor, rows: int, capacity: int, row_capacity: int | None = None) -> torch.Tensor:
    """A larger buffer holding the first `rows` rows of this one (the live ones)."""
    grown = buffer.new_zeros(max(row_capacity or 0, buffer.shape[0]), buffer.shape[1], capacity, buffer.shape[3])
    grown[:rows, :, : buffer.shape[2]] = buffer[:rows]
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
