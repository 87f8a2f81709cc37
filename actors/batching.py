"""Token-budget micro-batching: sort by length, then cut where padding would cost more than a forward pass.

Sorting first means each micro-batch holds rows of similar length; cutting by
least cost (padded tokens plus a per-pass overhead, within the token budget)
rather than greedily filling the budget keeps a short row out of a long row's
batch. Callers scatter results back to input order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

# What one forward pass costs beyond its tokens, in tokens of compute, by device type: the planner's default
# (measured with `python -m benchmarks.pass_overhead`: 43 on 2 CPU threads, 7,256 for Qwen3-0.6B bf16 on an H200).
PASS_OVERHEAD_TOKENS = {"cpu": 48, "cuda": 8192}

# The smallest token bucket of bucketed packed micro-batches (`token_buckets`).
MIN_BUCKET_TOKENS = 256


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
    widest = int(cap.max())

    def run_costs(j: int) -> tuple[int, np.ndarray]:
        lo = max(0, j - widest)
        rows = j - np.arange(lo, j)
        cost = (rows * longest[lo:j] + overhead_tokens).astype(np.float64)
        cost[rows > cap[lo:j]] = np.inf
        return lo, cost

    bounds = _least_cost_runs(n, run_costs)
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _least_cost_runs(n: int, run_costs: Callable[[int], tuple[int, np.ndarray]]) -> list[int]:
    """Bounds `[0, …, n]` that split n sorted rows into runs of least total cost (a shortest-path DP).

    `run_costs(j)` gives, for the runs `[i, j)` that may end at row j, the first start `lo` and the cost of each
    run for `i = lo … j-1` (`inf` where a run is not allowed)."""
    best = np.zeros(n + 1, dtype=np.float64)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        lo, cost = run_costs(j)
        total = best[lo:j] + cost
        k = int(np.argmin(total))
        best[j], start[j] = total[k], lo + k
    cuts = []
    j = n
    while j > 0:
        cuts.append(j)
        j = int(start[j])
    return [0] + cuts[::-1]


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


def token_buckets(max_tokens: int, min_tokens: int = 256) -> np.ndarray:
    """The fixed token counts a bucketed packed micro-batch is padded up to: the powers of two from `min_tokens`
    below `max_tokens`, and `max_tokens` itself (a budget halved on OOM gives a new top bucket, nothing else)."""
    max_tokens = max(1, int(max_tokens))
    powers = [1 << k for k in range(max(0, int(min_tokens) - 1).bit_length(), max_tokens.bit_length())]
    return np.array([p for p in powers if p < max_tokens] + [max_tokens], dtype=np.int64)


def bucket_tokens(total: int | np.ndarray, buckets: np.ndarray) -> int | np.ndarray:
    """The smallest bucket holding `total` tokens; a total above every bucket (one row longer than the budget,
    run alone) keeps its own length."""
    i = np.searchsorted(buckets, total, side="left")
    return np.where(i < len(buckets), buckets[np.minimum(i, len(buckets) - 1)], total)


def plan_bucketed(lengths: np.ndarray, max_tokens: int, buckets: np.ndarray,
                  overhead_tokens: int = 0) -> list[np.ndarray]:
    """Split row indices into packed micro-batches, each padded up to a bucket of `buckets` (fixed shapes
    that repeat), so that computed tokens (the buckets) plus `overhead_tokens` per micro-batch is least.

    Rows are sorted longest first and cut into runs whose real tokens fit `max_tokens` (a row longer than
    that runs alone, at its own length); the cuts come from a shortest-path search as in
    `plan_micro_batches`. Every index appears in exactly one micro-batch."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    ends = np.concatenate([[0], np.cumsum(lengths[order])])

    def run_costs(j: int) -> tuple[int, np.ndarray]:
        # runs order[i:j] within the budget: i from the first start that fits (the prefix sums grow), or j−1
        lo = min(int(np.searchsorted(ends, ends[j] - max_tokens, side="left")), j - 1)
        return lo, (bucket_tokens(ends[j] - ends[lo:j], buckets) + overhead_tokens).astype(np.float64)

    bounds = _least_cost_runs(n, run_costs)
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def packed_row_tokens(n: int, lengths: np.ndarray, batches: list[np.ndarray], computed: list[int]) -> np.ndarray:
    """Each row's share of the tokens its packed micro-batch computed: its length, plus the micro-batch's
    padding (`computed[k]` − its real tokens) split in proportion to length; the shares sum to `computed`.
    0 for rows not run."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(n, dtype=np.int64)
    for b, tokens in zip(batches, computed):
        if not len(b):
            continue
        real = lengths[b]
        pad = int(tokens) - int(real.sum())
        share = (pad * real) // max(int(real.sum()), 1)
        share[: pad - int(share.sum())] += 1  # what flooring left over, one token each to the first rows
        out[b] = real + share
    return out


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens computed including padding, for efficiency reports."""
    lengths = np.asarray(lengths)
    return int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))


def right_pad(seqs: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) of shape rows × longest, real tokens first: positions start at 0 in every row."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    mask = np.arange(int(lengths.max())) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.concatenate(seqs)  # row-major order of the mask's True cells is each row's tokens in turn
    return ids, mask.astype(np.int64)
