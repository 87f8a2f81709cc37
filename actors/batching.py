"""Token-budget micro-batching: sort by length, cut so rows × longest row fits the budget.

Sorting first means each micro-batch holds rows of similar length, so little
compute is spent on padding; callers scatter results back to input order.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class BatchStats:
    """What a replica computed: rows, real tokens, tokens including padding, seconds in forward passes."""

    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    forward_s: float = 0.0


def plan_micro_batches(lengths: np.ndarray, max_tokens: int, max_rows: int | None = None) -> list[np.ndarray]:
    """Split row indices into micro-batches, longest first, each within `max_tokens` counted with padding.

    A row longer than the budget runs alone. Every index appears in exactly one micro-batch.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)
        rows = max(1, max_tokens // longest)
        if max_rows is not None:
            rows = min(rows, max_rows)
        batches.append(order[start : start + rows])
        start += rows
    return batches


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens computed including padding, for efficiency reports."""
    lengths = np.asarray(lengths)
    return int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))


def row_padded_lengths(n: int, lengths: np.ndarray, batches: list[np.ndarray]) -> np.ndarray:
    """Each row's length as computed, padding included (its micro-batch's longest row); 0 for rows not run."""
    lengths = np.asarray(lengths)
    out = np.zeros(n, dtype=np.int64)
    for b in batches:
        if len(b):
            out[b] = int(lengths[b].max())
    return out


def right_pad(seqs: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) of shape rows × longest, real tokens first: positions start at 0 in every row."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    return ids, mask
