"""Token-budget micro-batching: every row once, budget respected, lengths sorted."""

import numpy as np
import pytest

from actors.batching import padded_tokens, plan_micro_batches, plan_packed, right_pad


@pytest.mark.parametrize("seed", range(20))
def test_every_row_exactly_once_and_budget_respected(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 600, size=int(rng.integers(1, 300)))
    budget = int(rng.integers(500, 5000))
    batches = plan_micro_batches(lengths, budget)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in batches:
        cost = len(b) * lengths[b].max()
        assert cost <= budget or len(b) == 1


def test_rows_are_grouped_longest_first_into_the_fewest_batches_when_a_pass_is_dear():
    lengths = np.array([5, 100, 7, 100, 50, 6])
    batches = plan_micro_batches(lengths, 200, overhead_tokens=1000)
    assert [lengths[b].tolist() for b in batches] == [[100, 100], [50, 7, 6, 5]]


def test_a_free_pass_means_no_padding_at_all():
    lengths = np.array([5, 100, 7, 100, 50, 6, 7])
    batches = plan_micro_batches(lengths, 200, overhead_tokens=0)
    assert padded_tokens(lengths, batches) == lengths.sum()
    assert [lengths[b].tolist() for b in batches] == [[100, 100], [50], [7, 7], [6], [5]]


def test_a_short_row_stays_out_of_a_long_rows_batch_when_padding_it_costs_more_than_a_pass():
    lengths = np.array([500, 480, 20, 18])
    batches = plan_micro_batches(lengths, 4096, overhead_tokens=64)
    assert [lengths[b].tolist() for b in batches] == [[500, 480], [20, 18]]


def brute_force_least_cost(sorted_lengths, budget, overhead):
    """Least padded tokens + overhead over every split of the sorted rows into runs within the budget."""
    n = len(sorted_lengths)
    best = {0: 0}
    for j in range(1, n + 1):
        best[j] = min(best[i] + (j - i) * sorted_lengths[i] + overhead for i in range(j)
                      if (j - i) * sorted_lengths[i] <= budget or j - i == 1)
    return best[n]


@pytest.mark.parametrize("seed", range(10))
def test_the_plan_costs_the_least_that_any_split_of_the_sorted_rows_costs(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=int(rng.integers(1, 14)))
    budget, overhead = int(rng.integers(200, 2000)), int(rng.integers(0, 200))
    batches = plan_micro_batches(lengths, budget, overhead_tokens=overhead)
    cost = padded_tokens(lengths, batches) + overhead * len(batches)
    assert cost == brute_force_least_cost(np.sort(lengths)[::-1], budget, overhead)


def test_max_rows_caps_a_micro_batch():
    batches = plan_micro_batches(np.ones(10, dtype=int), 1000, max_rows=4, overhead_tokens=1)
    assert sorted(len(b) for b in batches) == [2, 4, 4]


def test_long_tailed_lengths_waste_under_three_percent_on_padding():
    """The E5 goal of `python -m benchmarks` at the pipeline's window: 256 rows (one replica call),
    log-normal lengths of median 200 with a tail to 1024."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(200), 1.2, size=256), 8, 1024).astype(int)
    batches = plan_micro_batches(lengths, 16384, overhead_tokens=64)
    assert lengths.sum() / padded_tokens(lengths, batches) >= 0.97
    arrival = [np.arange(i, min(i + 32, 256)) for i in range(0, 256, 32)]
    assert lengths.sum() / padded_tokens(lengths, arrival) < 0.5


def test_sorting_removes_padding_that_arrival_order_would_compute():
    lengths = np.array([10, 500, 12, 480, 9, 510, 11, 505])
    sorted_cost = padded_tokens(lengths, plan_micro_batches(lengths, 1100, overhead_tokens=0))
    arrival = [np.arange(i, i + 2) for i in range(0, 8, 2)]
    assert sorted_cost < padded_tokens(lengths, arrival)
    assert sorted_cost == lengths.sum()


@pytest.mark.parametrize("seed", range(10))
def test_packed_batches_keep_input_order_and_fit_the_budget_in_real_tokens(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 600, size=int(rng.integers(1, 200)))
    budget = int(rng.integers(300, 3000))
    batches = plan_packed(lengths, budget)
    assert np.concatenate(batches).tolist() == list(range(len(lengths)))
    for b in batches:
        assert lengths[b].sum() <= budget or len(b) == 1
    for b, after in zip(batches, batches[1:]):  # each cut is forced: the next row would not have fitted
        assert lengths[b].sum() + lengths[after[0]] > budget


def test_right_padding_keeps_each_rows_tokens_first_and_masks_the_rest():
    ids, mask = right_pad([np.array([7, 8, 9]), np.array([5], dtype=np.int32), np.array([], dtype=np.int64),
                           np.array([1, 2])], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [5, 0, 0], [0, 0, 0], [1, 2, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]]
    assert ids.dtype == mask.dtype == np.int64
