"""A drafter's decoder whose prefill waits until a draft needs it: what every drafter kind's `prefill_put_off` is.

While gamma auto decodes plainly (a large batch, where verifying drafts costs more than they save) a drafter
should cost nothing, not even its prefill (on the demo world at batch 32: 4% of the run for text-only, 8% for
MSD's head). Put off, a group of rows that joined together keeps only how to build its inputs (a function of the
target's prefill), not the inputs themselves: building them (MSD's fuse over every prompt token, a causal LM's
embedding and padding) cost 0.7 ms (text-only) and 2.5 ms (MSD) an admission of 32 rows on the demo world, paid by
every batch although gamma auto decodes most large batches plainly. The first draft builds and prefills every
waiting row in one call. Rows that join a batch the decoder reads already are prefilled at once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.engine.decoder import RaggedDecoder
from pipeline.engine.padding import left_pad

# A group's prefill inputs: its left-padded input embeddings [B, W, H] (row i's inputs are its last
# len(positions[i]) columns) and, per row, the positions of its inputs.
PrefillInputs = Callable[[], tuple[torch.Tensor, list[list[int]]]]


class _Built:
    """A group's inputs, built on first use (rows of a group may be taken apart, and each part asks)."""

    def __init__(self, build: PrefillInputs):
        self.build, self.inputs = build, None

    def __call__(self) -> tuple[torch.Tensor, list[list[int]]]:
        if self.inputs is None:
            self.inputs, self.build = self.build(), None
        return self.inputs


@dataclass
class _PutOffGroup:
    """Rows that joined together and wait for their prefill: `rows` of the group's inputs, in batch order."""

    inputs: _Built
    rows: list[int]


class PutOffDecoder:
    """A RaggedDecoder whose rows are prefilled on the first forward after they join (or at `prefill_put_off`)."""

    def __init__(self, ragged: RaggedDecoder):
        self.ragged = ragged
        self.device, self.dtype = ragged.device, ragged.dtype
        self.put_off: list[_PutOffGroup] | None = []  # None once the decoder holds the rows

    @property
    def waits(self) -> bool:
        """Rows wait for their prefill."""
        return bool(self.put_off)

    def prefill(self, inputs: PrefillInputs, rows: int, append: bool = False) -> None:
        """These `rows` rows' prefill, as the whole batch or (append) after the decoder's rows; `inputs` builds it."""
        joining = _PutOffGroup(_Built(inputs), list(range(rows)))
        if append and self.put_off is None:  # the decoder reads these rows' batch already: they join it now
            self._prefill([joining], append=True)
        else:
            self.put_off = (self.put_off if append else []) + [joining]

    def prefill_put_off(self) -> int:
        """Prefill the rows whose prefill waits (all of them, or none); returns how many."""
        rows = sum(len(group.rows) for group in self.put_off or [])
        if rows:
            self._prefill(self.put_off, append=False)
            self.put_off = None
        return rows

    def _prefill(self, groups: list[_PutOffGroup], append: bool) -> None:
        parts, positions = [], []
        for group in groups:
            embeds, group_positions = group.inputs()
            parts.append(embeds[torch.tensor(group.rows, device=embeds.device)])
            positions += [group_positions[i] for i in group.rows]
        positions_padded, mask = left_pad(positions, 0, self.device)
        embeds = torch.cat([_left_padded_to(part, mask.shape[1]) for part in parts])
        offsets = torch.tensor([row[-1] + 1 - len(row) for row in positions])  # where each row continues
        self.ragged.prefill(mask, positions_padded, offsets, append=append, inputs_embeds=embeds)

    def forward(self, **inputs):
        """RaggedDecoder.forward, after the prefill of rows that wait for it."""
        self.prefill_put_off()
        return self.ragged.forward(**inputs)

    def rollback(self, num_dropped: torch.Tensor) -> None:
        """Discard the last num_dropped[i] tokens of row i (host tensor); nothing while the prefill waits (no forward
        has appended anything then)."""
        if self.put_off is None:
            self.ragged.rollback(num_dropped)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.put_off is None:
            self.ragged.select_rows(rows)
        else:
            self.put_off = _select(self.put_off, rows.tolist())

    def fork(self) -> PutOffDecoder:
        """The same model with rows of its own (none yet): rows prefilled ahead of their admission wait in one."""
        forked = copy.copy(self)
        forked.ragged, forked.put_off = self.ragged.fork(), []
        return forked

    def adopt_rows(self, other: PutOffDecoder, count: int, append: bool) -> None:
        """Move the last `count` rows of a fork after these rows (or, not append, in place of them)."""
        if other.put_off is not None and (self.put_off is not None or not append):  # no cache to move
            keep = sum(len(group.rows) for group in other.put_off) - count
            self.put_off = (self.put_off if append else []) + _select(other.put_off, range(keep, keep + count))
            other.put_off = _select(other.put_off, range(keep))
        else:  # into a cache: their prefill now (the fork's rows wait to join, all of them)
            other.prefill_put_off()
            if append:
                self.prefill_put_off()
            self.ragged.adopt_rows(other.ragged, count, append)
            self.put_off = None


def _left_padded_to(embeds: torch.Tensor, width: int) -> torch.Tensor:
    """Left-padded embeddings [B, W, H] as [B, width, H]: padding columns cut or added on the left (the widest row
    fits width)."""
    if embeds.shape[1] >= width:
        return embeds[:, embeds.shape[1] - width :]
    return torch.cat([embeds.new_zeros((embeds.shape[0], width - embeds.shape[1], embeds.shape[2])), embeds], dim=1)


def _select(groups: list[_PutOffGroup], rows) -> list[_PutOffGroup]:
    """These rows (indices in the groups' batch order), in this order, as groups (consecutive rows of one group
    stay one)."""
    owners = [(group, i) for group in groups for i in group.rows]
    selected: list[_PutOffGroup] = []
    for row in rows:
        group, i = owners[row]
        if selected and selected[-1].inputs is group.inputs:
            selected[-1].rows.append(i)
        else:
            selected.append(_PutOffGroup(group.inputs, [i]))
    return selected
