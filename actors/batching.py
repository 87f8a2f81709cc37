"""Token-budget micro-batching: sort by length, then cut where padding would cost more than a forward pass.

Sorting first means each micro-batch holds rows of similar length; cutting by
least cost (padded tokens plus a per-pass overhead, within the token budget)
rather than greedily filling the budget keeps a short row out of a long row's
batch. Callers scatter results back to input order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# What one forward pass costs beyond its tokens, in tokens of compute, by device type: the planner's default
# (measured with `python -m benchmarks.pass_overhead`: 43 on 2 CPU threads, 7,256 for Qwen3-0.6B bf16 on an H200).
PASS_OVERHEAD_TOKENS = {"cpu": 48, "cuda": 8192}


def pass_overhead_tokens(device_type: str, configured: int | None = None) -> int:
    return configured if configured is not None else PASS_OVERHEAD_TOKENS.get(device_type, 1024)


@dataclasses.dataclass
class BatchStats:
    """What a replica computed: rows, real tokens, tokens including padding, seconds in forward passes."""

    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    forward_s: float = 0.0


def plan_micro_batches(lengths: np.ndarray, max_tokens: int, max_rows: int | None = None,
                       overhead_tokens: int = 0) -> list[np.ndarray]:
    """Split row indices into micro-batches of similar length, longest first, each within `max_tokens`
    counted with padding, so that padded tokens plus `overhead_tokens` per micro-batch is least.

    `overhead_tokens` prices one forward pass (kernel launches, Python) in tokens of compute: 0 gives
    batches without padding where lengths repeat; a large value gives the fewest, fullest batches. A row
    longer than the budget runs alone. Every index appears in exactly one micro-batch.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    n = len(order)
    if n == 0:
        return []
    longest = np.maximum(lengths[order], 1)
    # a micro-batch is a run order[i:j]; its longest row is the first, so it may hold cap[i] rows
    cap = np.maximum(1, max_tokens // longest)
    if max_rows is not None:
        cap = np.minimum(cap, max_rows)
    # least cost of the first j sorted rows, and where its last micro-batch starts (a shortest-path DP)
    best = np.zeros(n + 1, dtype=np.float64)
    start = np.zeros(n + 1, dtype=np.int64)
    widest = int(cap.max())
    for j in range(1, n + 1):
        lo = max(0, j - widest)
        i = np.arange(lo, j)
        rows = j - i
        cost = best[lo:j] + rows * longest[lo:j] + overhead_tokens
        cost[rows > cap[lo:j]] = np.inf
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], lo + k
    cuts = []
    j = n
    while j > 0:
        cuts.append(j)
        j = int(start[j])
    bounds = [0] + cuts[::-1]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def plan_packed(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Split row indices, in order, into runs whose summed length fits `max_tokens`: micro-batches for a
    padding-free (packed, variable-length attention) forward pass. A row longer than the budget runs alone."""
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    batches: list[np.ndarray] = []
    start, before = 0, 0
    while start < len(ends):
        stop = max(start + 1, int(np.searchsorted(ends, before + max_tokens, side="right")))
        batches.append(np.arange(start, stop))
        start, before = stop, int(ends[stop - 1])
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
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    mask = np.arange(int(lengths.max())) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.concatenate(seqs)  # row-major order of the mask's True cells is each row's tokens in turn
    return ids, mask.astype(np.int64)
