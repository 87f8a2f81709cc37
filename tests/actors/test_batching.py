"""Token-budget micro-batching: every row once, budget respected, lengths sorted."""

import numpy as np
import pytest

from actors.batching import padded_tokens, plan_micro_batches


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


def test_rows_are_grouped_longest_first():
    lengths = np.array([5, 100, 7, 100, 50, 6])
    batches = plan_micro_batches(lengths, 200)
    assert [lengths[b].tolist() for b in batches] == [[100, 100], [50, 7, 6, 5]]


def test_a_row_longer_than_the_budget_runs_alone():
    batches = plan_micro_batches(np.array([10, 5000, 10]), 100)
    assert [b.tolist() for b in batches] == [[1], [0, 2]]


def test_max_rows_caps_a_micro_batch():
    batches = plan_micro_batches(np.ones(10, dtype=int), 1000, max_rows=4)
    assert [len(b) for b in batches] == [4, 4, 2]


def test_sorting_removes_padding_that_arrival_order_would_compute():
    lengths = np.array([10, 500, 12, 480, 9, 510, 11, 505])
    sorted_cost = padded_tokens(lengths, plan_micro_batches(lengths, 1100))
    arrival = [np.arange(i, i + 2) for i in range(0, 8, 2)]
    assert sorted_cost < padded_tokens(lengths, arrival)
    assert sorted_cost == 2 * 510 + 2 * 500 + 4 * 12
