"""Resume at scale: the ids already written, as a compact set every read task shares without copying it.

A resumed job must skip every id its output already holds; with 10^7 ids a Python set
of strings is gigabytes, and shipping it to each read task copies it into every task.
`FinishedIds` keeps a 128-bit digest per id instead (16 bytes: the high halves sorted for
a binary search, the low halves to confirm a match, so two ids are confused only when
all 128 bits agree). The driver builds it part by part from the output's id columns
and puts it in the object store once; read tasks get the two numpy arrays zero-copy
from shared memory and test a batch of ids with one vectorised search.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np


def _digests(ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) uint64 halves of each id's 128-bit BLAKE2b digest."""
    raw = b"".join(hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids)
    halves = np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 2)
    return halves[:, 0], halves[:, 1]


class FinishedIds:
    def __init__(self, high: np.ndarray | None = None, low: np.ndarray | None = None):
        """high, low: the digests' halves, sorted by (high, low) and unique, as `of` makes them."""
        self.high = np.zeros(0, np.uint64) if high is None else high
        self.low = np.zeros(0, np.uint64) if low is None else low

    @classmethod
    def of(cls, id_batches: Iterable[Iterable[str]]) -> FinishedIds:
        """From batches of ids (e.g. one output part's id column at a time), duplicates allowed."""
        highs, lows = [], []
        for ids in id_batches:
            high, low = _digests(ids)
            highs.append(high)
            lows.append(low)
        if not highs:
            return cls()
        unique = np.unique(np.stack([np.concatenate(highs), np.concatenate(lows)], axis=1), axis=0)  # sorted rows
        return cls(unique[:, 0].copy(), unique[:, 1].copy())

    def __len__(self) -> int:
        return len(self.high)

    def __bool__(self) -> bool:
        return len(self.high) > 0

    def contains(self, ids: list[str]) -> np.ndarray:
        """[len(ids)] bool: which of these ids are already written."""
        if not len(self.high) or not ids:
            return np.zeros(len(ids), dtype=bool)
        high, low = _digests(ids)
        start = np.searchsorted(self.high, high, side="left")
        stop = np.searchsorted(self.high, high, side="right")
        found = np.zeros(len(ids), dtype=bool)
        for i in np.nonzero(stop > start)[0]:  # equal high halves are rare: confirm on the low halves
            found[i] = bool((self.low[start[i] : stop[i]] == low[i]).any())
        return found

    def __contains__(self, row_id: str) -> bool:
        return bool(self.contains([row_id])[0])
