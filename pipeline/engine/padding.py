"""Padding token lists into batches: left for HF prefill, right for the ragged rows of every later forward."""

from __future__ import annotations

import torch


def left_pad(rows: list[list[int]], pad_value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: returns ids [B, L] and a 0/1 attention mask [B, L]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], pad_value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: returns ids [B, L] on `device` and the row lengths [B] on the host."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), torch.tensor([len(r) for r in rows])
