"""Token buckets: packed micro-batches padded up to a few fixed token counts, so that shapes repeat."""

import itertools

import numpy as np
import pytest
import torch

from actors.batching import bucket_tokens, packed_row_tokens, plan_bucketed, token_buckets
from actors.budget import AdaptiveBudget


def test_the_buckets_are_powers_of_two_up_to_the_budget_and_the_budget_itself():
    assert token_buckets(16384, 256).tolist() == [256, 512, 1024, 2048, 4096, 8192, 16384]
    assert token_buckets(12000, 256).tolist() == [256, 512, 1024, 2048, 4096, 8192, 12000]
    assert token_buckets(300, 256).tolist() == [256, 300]
    assert token_buckets(256, 256).tolist() == [256]
    assert token_buckets(100, 256).tolist() == [100]
    assert token_buckets(1000, 200).tolist() == [256, 512, 1000]


def test_a_total_goes_to_the_smallest_bucket_that_holds_it_or_keeps_its_length_above_them_all():
    buckets = token_buckets(4096, 256)
    assert [int(bucket_tokens(t, buckets)) for t in (1, 256, 257, 4000, 4096, 5000)] == [256, 256, 512, 4096,
                                                                                       4096, 5000]


def computed(lengths, batches, buckets):
    return [int(bucket_tokens(int(lengths[b].sum()), buckets)) for b in batches]


@pytest.mark.parametrize("seed", range(20))
def test_every_row_once_budget_respected_and_shapes_from_the_fixed_set(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 900, size=int(rng.integers(1, 300)))
    budget = int(rng.integers(600, 6000))
    buckets = token_buckets(budget, 256)
    batches = plan_bucketed(lengths, budget, buckets, overhead_tokens=int(rng.integers(0, 2000)))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b, tokens in zip(batches, computed(lengths, batches, buckets)):
        real = int(lengths[b].sum())
        if real > budget:  # only a row longer than the budget, alone, at its own length
            assert len(b) == 1 and tokens == real
        else:
            assert tokens in buckets and real <= tokens <= budget


def brute_force_least_cost(sorted_lengths, budget, buckets, overhead):
    """Least buckets + overhead over every split of the sorted rows into runs within the budget."""
    n = len(sorted_lengths)
    ends = np.concatenate([[0], np.cumsum(sorted_lengths)])
    best = {0: 0}
    for j in range(1, n + 1):
        best[j] = min(best[i] + int(bucket_tokens(int(ends[j] - ends[i]), buckets)) + overhead
                      for i in range(j) if ends[j] - ends[i] <= budget or j - i == 1)
    return best[n]


@pytest.mark.parametrize("seed", range(10))
def test_the_plan_computes_the_least_any_split_of_the_sorted_rows_computes(seed):
    rng = np.random.default_rng(100 + seed)
    lengths = rng.integers(1, 400, size=int(rng.integers(1, 13)))
    budget, overhead = int(rng.integers(300, 2500)), int(rng.integers(0, 300))
    buckets = token_buckets(budget, 64)
    batches = plan_bucketed(lengths, budget, buckets, overhead)
    cost = sum(computed(lengths, batches, buckets)) + overhead * len(batches)
    assert cost == brute_force_least_cost(np.sort(lengths)[::-1], budget, buckets, overhead)


def test_uniform_rows_fill_whole_buckets():
    lengths = np.full(64, 256)  # 16,384 tokens
    batches = plan_bucketed(lengths, 4096, token_buckets(4096, 256), overhead_tokens=8192)
    assert [len(b) for b in batches] == [16] * 4 and computed(lengths, batches, token_buckets(4096, 256)) == [4096] * 4


@pytest.mark.parametrize("seed", range(5))
def test_row_shares_of_a_bucket_sum_to_what_it_computed(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=50)
    buckets = token_buckets(2048, 256)
    batches = plan_bucketed(lengths, 2048, buckets, 100)
    tokens = computed(lengths, batches, buckets)
    per_row = packed_row_tokens(len(lengths) + 2, np.append(lengths, [0, 0]), batches, tokens)
    assert per_row.sum() == sum(tokens) and per_row[-2:].tolist() == [0, 0]
    assert np.all(per_row[:-2] >= lengths)
    for b, t in zip(batches, tokens):
        assert per_row[b].sum() == t


def test_the_budget_halves_on_oom_and_its_buckets_follow(capsys):
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 300, size=200)
    done, sizes = [], []
    budget = AdaptiveBudget(8192, overhead_tokens=1000, packed=True, min_bucket=256)

    def compute(rows):
        tokens = budget.cost(lengths[rows])
        if tokens > 1500:
            raise torch.OutOfMemoryError("CUDA out of memory")
        done.extend(rows.tolist())
        sizes.append(tokens)

    ran = budget.run(lengths, compute)
    assert sorted(done) == list(range(200)) and sorted(np.concatenate(ran).tolist()) == list(range(200))
    assert budget.halvings >= 1 and budget.max_tokens <= 1500
    assert budget.buckets.tolist() == token_buckets(budget.max_tokens, 256).tolist()
    assert set(sizes) <= set(budget.buckets.tolist())  # the batches that ran all had a fixed shape
    assert "token budget halved to" in capsys.readouterr().err


def test_buckets_only_apply_to_packed_batches():
    assert AdaptiveBudget(4096, 0, packed=False, min_bucket=256).buckets is None
    assert AdaptiveBudget(4096, 0, packed=True).cost(np.array([5, 7])) == 12
    assert AdaptiveBudget(4096, 0, packed=True, min_bucket=256).cost(np.array([5, 7])) == 256
    assert AdaptiveBudget(4096, 0, packed=True, min_bucket=256).cost(np.array([5000])) == 5000


def test_planning_a_replica_call_is_quick():
    """1,024 short rows under a 65,536-token budget (configs/backfill.yaml's call) plan in well under a second."""
    import time

    lengths = np.random.default_rng(0).integers(8, 64, size=1024)
    started = time.perf_counter()
    batches = plan_bucketed(lengths, 65536, token_buckets(65536, 256), 8192)
    assert time.perf_counter() - started < 1.0
    assert sum(len(b) for b in batches) == 1024


def test_planning_is_deterministic():
    lengths = np.array([5, 9, 5, 9, 1, 300, 2])
    plans = [plan_bucketed(lengths, 512, token_buckets(512, 64), 50) for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in itertools.zip_longest(*plans))
