"""A drafter's decoder whose prefill waits until a draft needs it: what every drafter kind's `prefill_put_off` is.

While gamma auto decodes plainly (a large batch, where verifying drafts costs more than they save) a drafter
should cost nothing, not even its prefill (on the demo world at batch 32: 4% of the run for text-only, 8% for
MSD's head). Put off, a row keeps the input embeddings of its prompt; the first draft prefills every waiting row
in one call. Rows that join a batch the decoder reads already are prefilled at once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pipeline.engine.decoder import RaggedDecoder
from pipeline.engine.padding import left_pad


@dataclass
class _PutOffRow:
    """A row whose prefill waits: its input embeddings [L, H], positions, next position minus its length."""

    embeds: torch.Tensor
    positions: list[int]
    offset: int


class PutOffDecoder:
    """A RaggedDecoder whose rows are prefilled on the first forward after they join (or at `prefill_put_off`)."""

    def __init__(self, ragged: RaggedDecoder):
        self.ragged = ragged
        self.device, self.dtype = ragged.device, ragged.dtype
        self.put_off: list[_PutOffRow] | None = []  # None once the decoder holds the rows

    @property
    def waits(self) -> bool:
        """Rows wait for their prefill."""
        return bool(self.put_off)

    def prefill(
        self,
        embeds: torch.Tensor,  # [B, W, H] left-padded: row i's inputs are its last len(positions[i]) columns
        positions: list[list[int]],  # per row, the positions of its inputs
        append: bool = False,  # these rows join the decoder's rows instead of replacing them
    ) -> None:
        width = embeds.shape[1]
        joining = [_PutOffRow(embeds[i, width - len(row):], row, row[-1] + 1 - len(row))
                   for i, row in enumerate(positions)]
        if append and self.put_off is None:  # the decoder reads these rows' batch already: they join it now
            self._prefill(joining, append=True)
        else:
            self.put_off = (self.put_off if append else []) + joining

    def prefill_put_off(self) -> int:
        """Prefill the rows whose prefill waits (all of them, or none); returns how many."""
        rows = len(self.put_off or [])
        if rows:
            self._prefill(self.put_off, append=False)
            self.put_off = None
        return rows

    def _prefill(self, rows: list[_PutOffRow], append: bool) -> None:
        positions, mask = left_pad([row.positions for row in rows], 0, self.device)
        width = mask.shape[1]
        embeds = rows[0].embeds.new_zeros((len(rows), width, rows[0].embeds.shape[-1]))
        for i, row in enumerate(rows):
            embeds[i, width - len(row.positions):] = row.embeds
        offsets = torch.tensor([row.offset for row in rows])  # where each row continues
        self.ragged.prefill(mask, positions, offsets, append=append, inputs_embeds=embeds)

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
            self.put_off = [self.put_off[i] for i in rows.tolist()]

    def fork(self) -> PutOffDecoder:
        """The same model with rows of its own (none yet): rows prefilled ahead of their admission wait in one."""
        forked = copy.copy(self)
        forked.ragged, forked.put_off = self.ragged.fork(), []
        return forked

    def adopt_rows(self, other: PutOffDecoder, count: int, append: bool) -> None:
        """Move the last `count` rows of a fork after these rows (or, not append, in place of them)."""
        if other.put_off is not None and (self.put_off is not None or not append):  # no cache to move
            keep = len(other.put_off) - count
            self.put_off = (self.put_off if append else []) + other.put_off[keep:]
            other.put_off = other.put_off[:keep]
        else:  # into a cache: their prefill now (the fork's rows wait to join, all of them)
            other.prefill_put_off()
            if append:
                self.prefill_put_off()
            self.ragged.adopt_rows(other.ragged, count, append)
            self.put_off = None
