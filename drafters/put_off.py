"""A drafter's decoder whose prefill waits until a draft needs it: what every drafter kind's `prefill_put_off` is.

While gamma auto decodes plainly (a large batch, where verifying drafts costs more than they save) a drafter
should cost nothing, not even its prefill (on the demo world at batch 32: 4% of the run for text-only, 8% for
MSD's head). Put off, a group of rows that joined together keeps only how to build its inputs (a function of the
target's prefill), not the inputs themselves: building them (MSD's fuse over every prompt token, a causal LM's
embedding and padding) cost 0.7 ms (text-only) and 2.5 ms (MSD) an admission of 32 rows on the demo world, paid by
every batch although gamma auto decodes most large batches plainly. The first draft builds and prefills every
waiting row in one call. Rows that join a batch the decoder reads already are prefilled at once while the batch
drafts, and wait behind the decoder's rows while it decodes plainly: with continuous batching a probe has the decoder
read the batch, and prefilled at once from then on, every joining row's prefill was paid though `auto` went on
decoding plainly (MSD at batch 32 on the demo world, 2048 rows: `auto` 0.89-0.91x the engine without a drafter by
the median round, 0.91-0.94x with joining rows kept waiting, three runs each in turn).
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

    @property
    def size(self) -> int:
        """Rows of the group's inputs: every row that joined with it."""
        return len(self.inputs()[1])


class PutOffDecoder:
    """A RaggedDecoder whose rows are prefilled on the first forward after they join (or at `prefill_put_off`).

    The decoder's cache holds `held` rows; rows that joined after them wait in `put_off`. While some wait, `order`
    says which of [held rows, waiting rows] each row of the batch is (the batch fills a finished row's place with
    its last row); the cache takes the batch's order when the waiting rows are prefilled. Its drafter sets
    `drafting` at each step (whether the step drafted)."""

    def __init__(self, ragged: RaggedDecoder):
        self.ragged = ragged
        self.device, self.dtype = ragged.device, ragged.dtype
        self.held = 0
        self.put_off: list[_PutOffGroup] = []
        self.order: list[int] | None = None  # None: the batch's rows are [held rows, waiting rows] in that order
        self.drafting = False

    @property
    def waits(self) -> bool:
        """Rows wait for their prefill."""
        return bool(self.put_off)

    @property
    def _waiting(self) -> int:
        return _rows_in(self.put_off)

    def prefill(self, inputs: PrefillInputs, rows: int, append: bool = False) -> None:
        """These `rows` rows' prefill, as the whole batch or (append) after the decoder's rows; `inputs` builds it."""
        joining = _PutOffGroup(_Built(inputs), list(range(rows)))
        if append and self.held and not self.put_off:  # the decoder reads these rows' batch already: they join it now
            self._prefill(self.ragged, [joining], append=True)
            self.held += rows
        else:
            self._wait([joining], append)

    def _wait(self, groups: list[_PutOffGroup], append: bool) -> None:
        """These groups' rows join the batch (after its rows, or in place of them) with their prefill waiting."""
        if not append:
            self.held, self.put_off, self.order = 0, [], None
        if self.order is not None:
            first = self.held + self._waiting
            self.order += range(first, first + _rows_in(groups))
        self.put_off += groups

    def prefill_put_off(self) -> int:
        """Prefill the rows whose prefill waits (after the rows the decoder holds), then put the cache in the batch's
        order; returns how many rows were prefilled."""
        rows = self._waiting
        if not rows:
            return 0
        if self.held or len(self.put_off) > 1 or len(self.put_off[0].rows) < self.put_off[0].size:
            for i, group in enumerate(self.put_off):
                self._append_as_joined(group, append=bool(self.held or i))
        else:  # one whole group into an empty cache: as its staged batch would prefill it
            self._prefill(self.ragged, self.put_off, append=False)
        self.held, self.put_off = self.held + rows, []
        if self.order is not None:
            if self.order != list(range(self.held)):
                self.ragged.select_rows(torch.tensor(self.order))
            self.held, self.order = len(self.order), None
        return rows

    def _append_as_joined(self, group: _PutOffGroup, append: bool) -> None:
        """The group's rows after the decoder's, with the numbers they would have had joining at once: the whole
        group prefilled as its staged batch prefills it, then the rows copied over (a prefill's numbers move with
        its width, a later forward's with the cache's layout, and a row must draft the same however it joined)."""
        staged = self.ragged.fork()
        self._prefill(staged, [_PutOffGroup(group.inputs, list(range(group.size)))], append=False)
        if group.rows != list(range(group.size)):
            staged.select_rows(torch.tensor(group.rows))
        self.ragged.adopt_rows(staged, len(group.rows), append)

    def _prefill(self, ragged: RaggedDecoder, groups: list[_PutOffGroup], append: bool) -> None:
        parts, positions = [], []
        for group in groups:
            embeds, group_positions = group.inputs()
            parts.append(embeds[torch.tensor(group.rows, device=embeds.device)])
            positions += [group_positions[i] for i in group.rows]
        positions_padded, mask = left_pad(positions, 0, self.device)
        embeds = torch.cat([_left_padded_to(part, mask.shape[1]) for part in parts])
        offsets = torch.tensor([row[-1] + 1 - len(row) for row in positions])  # where each row continues
        ragged.prefill(mask, positions_padded, offsets, append=append, inputs_embeds=embeds)

    def forward(self, **inputs):
        """RaggedDecoder.forward, after the prefill of rows that wait for it."""
        self.prefill_put_off()
        return self.ragged.forward(**inputs)

    def rollback(self, num_dropped: torch.Tensor) -> None:
        """Discard the last num_dropped[i] tokens of row i (host tensor); only a drafting step rolls back, and no row
        waits then."""
        if self.held:
            self.ragged.rollback(num_dropped)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep these rows of the batch, in this order."""
        if not self.put_off:
            if self.held:
                self.ragged.select_rows(rows)
                self.held = len(rows)
            return
        order = self.order if self.order is not None else list(range(self.held + self._waiting))
        kept = [order[row] for row in rows.tolist()]
        waiting = sorted(row - self.held for row in kept if row >= self.held)  # still running
        self.put_off = _select(self.put_off, waiting)
        renumbered = {row: self.held + i for i, row in enumerate(waiting)}
        self.order = [row if row < self.held else renumbered[row - self.held] for row in kept]
        if not self.put_off:  # none waits any more: the cache takes the batch's order now
            self.ragged.select_rows(torch.tensor(self.order))
            self.held, self.order = len(self.order), None

    def fork(self) -> PutOffDecoder:
        """The same model with rows of its own (none yet): rows prefilled ahead of their admission wait in one."""
        forked = copy.copy(self)
        forked.ragged, forked.held, forked.put_off, forked.order = self.ragged.fork(), 0, [], None
        return forked

    def adopt_rows(self, other: PutOffDecoder, count: int, append: bool) -> None:
        """Move the last `count` rows of a fork after these rows (or, not append, in place of them). Rows whose
        prefill waits in the fork wait here too where these rows' prefill waits, or there are none, or the last step
        decoded plainly; else they are prefilled now, into the decoder's cache (the fork's rows wait to join, all of
        them)."""
        if not other.held and (self.put_off or not self.held or not append or not self.drafting):  # no cache to move
            keep = other._waiting - count
            self._wait(_select(other.put_off, range(keep, keep + count)), append)
            other.put_off = _select(other.put_off, range(keep))
        else:  # into a cache: their prefill now
            other.prefill_put_off()
            if append:
                self.prefill_put_off()
            else:
                self.put_off, self.order = [], None
            self.ragged.adopt_rows(other.ragged, count, append)
            self.held, other.held = (self.held if append else 0) + count, other.held - count


def _rows_in(groups: list[_PutOffGroup]) -> int:
    return sum(len(group.rows) for group in groups)


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
