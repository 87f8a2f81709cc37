"""A token budget that halves when the device runs out of memory, and runs every row exactly once regardless.

A budget that fits a GPU at start can stop fitting later (fragmentation, a neighbour
process, a long tail batch): rather than fail the item, the micro-batch that hit CUDA
OOM and every one after it are planned again at half the budget, as
text-embeddings-inference does. The lower budget is kept for later calls.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch

from actors.batching import bucket_tokens, plan_bucketed, plan_micro_batches, plan_packed, token_buckets
from common.errors import DeviceMemoryError


class AdaptiveBudget:
    """Plans micro-batches within `max_tokens` and halves it on CUDA OOM.

    Padded batches (the default) count rows × longest row; `packed` ones count their rows' tokens only, or,
    with `min_bucket`, the fixed bucket they are padded up to (`actors.batching.token_buckets(max_tokens,
    min_bucket)`: the buckets follow a halved budget)."""

    def __init__(self, max_tokens: int, overhead_tokens: int, packed: bool = False, min_bucket: int | None = None):
        self.max_tokens = max_tokens
        self.overhead_tokens = overhead_tokens
        self.packed = packed
        self.min_bucket = min_bucket if packed else None
        self.halvings = 0

    @property
    def buckets(self) -> np.ndarray | None:
        """The token counts bucketed micro-batches are padded to now; None when not bucketing."""
        return None if self.min_bucket is None else token_buckets(self.max_tokens, self.min_bucket)

    def plan(self, lengths: np.ndarray) -> list[np.ndarray]:
        if self.min_bucket is not None:
            return plan_bucketed(lengths, self.max_tokens, self.buckets, self.overhead_tokens)
        if self.packed:
            return plan_packed(lengths, self.max_tokens)
        return plan_micro_batches(lengths, self.max_tokens, overhead_tokens=self.overhead_tokens)

    def cost(self, lengths: np.ndarray) -> int:
        """Tokens a micro-batch of these lengths computes."""
        if self.min_bucket is not None:
            return int(bucket_tokens(int(lengths.sum()), self.buckets))
        return int(lengths.sum()) if self.packed else len(lengths) * int(lengths.max())

    def run(self, lengths: np.ndarray, compute: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        """Call `compute(rows)` on micro-batches of `range(len(lengths))` covering every row once; returns
        the micro-batches as they ran (a retried one counts once, as it finally ran)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        ran: list[np.ndarray] = []
        pending = np.arange(len(lengths))
        while len(pending):
            batches = [pending[b] for b in self.plan(lengths[pending])]
            for k, rows in enumerate(batches):
                if not self._try(compute, rows):
                    # outside the except block: its traceback no longer holds the failed pass's tensors
                    self._halve(rows, lengths)
                    pending = np.concatenate(batches[k:])
                    break
                ran.append(rows)
            else:
                pending = pending[:0]
        return ran

    @staticmethod
    def _try(compute: Callable[[np.ndarray], None], rows: np.ndarray) -> bool:
        try:
            compute(rows)
        except torch.OutOfMemoryError:
            return False
        return True

    def _halve(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        tried = self.cost(lengths[rows])
        if len(rows) == 1:
            raise DeviceMemoryError(
                f"a single sequence of {tried} tokens does not fit in device memory: lower model.max_length"
            ) from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.max_tokens = max(1, min(self.max_tokens, tried) // 2)
        self.halvings += 1
        print(f"embedrank: CUDA out of memory on a micro-batch of {len(rows)} rows ({tried} tokens computed); "
              f"token budget halved to {self.max_tokens}", file=sys.stderr, flush=True)


class BudgetedModel:
    """Mixin of the model classes: `max_batch_tokens` reads and sets their `budget`'s current token budget."""

    budget: AdaptiveBudget

    @property
    def max_batch_tokens(self) -> int:
        return self.budget.max_tokens

    @max_batch_tokens.setter
    def max_batch_tokens(self, tokens: int) -> None:
        self.budget.max_tokens = tokens
