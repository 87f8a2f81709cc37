"""CUDA out of memory halves the token budget and retries: every row computed once, the same vectors.

The device here is a CPU, so the OOM is raised by a wrapped forward pass whenever a micro-batch computes more
than a set number of tokens, the way a GPU with that much free memory would.
"""

import numpy as np
import pytest
import torch

from actors.budget import AdaptiveBudget
from actors.embedder import Embedder
from common.errors import DeviceMemoryError


def test_micro_batches_over_the_memory_limit_are_planned_again_at_half_the_budget(capsys):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=120)
    done: list[int] = []
    tried: list[int] = []

    def compute(rows):
        cost = len(rows) * int(lengths[rows].max())
        tried.append(cost)
        if cost > 700:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        done.extend(rows.tolist())

    budget = AdaptiveBudget(4096, overhead_tokens=1000)
    ran = budget.run(lengths, compute)
    assert sorted(done) == list(range(120))  # every row exactly once
    assert sorted(np.concatenate(ran).tolist()) == list(range(120))
    assert budget.halvings >= 2 and 350 < budget.max_tokens <= 700  # halved until it fits, no further
    assert max(tried) > 700 and all(len(b) * lengths[b].max() <= 700 for b in ran)
    assert "token budget halved to" in capsys.readouterr().err


def test_the_halved_budget_is_kept_for_later_calls():
    lengths = np.full(64, 10)
    calls = []

    def compute(rows):
        calls.append(len(rows))
        if len(rows) * 10 > 160:
            raise torch.OutOfMemoryError("CUDA out of memory")

    budget = AdaptiveBudget(640, overhead_tokens=1000)
    budget.run(lengths, compute)
    calls.clear()
    budget.run(lengths, compute)
    assert calls == [16, 16, 16, 16]  # no failed try on the second call


def test_a_single_sequence_that_does_not_fit_names_the_setting_to_lower():
    def compute(rows):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(DeviceMemoryError, match="single sequence of 300 tokens.*model.max_length"):
        AdaptiveBudget(4096, overhead_tokens=0).run(np.array([300]), compute)


def test_other_errors_are_not_taken_for_memory():
    def compute(rows):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        AdaptiveBudget(4096, overhead_tokens=0).run(np.array([3, 4]), compute)


def test_an_embedder_that_runs_out_of_memory_returns_the_vectors_it_would_have(tiny_embedding_model):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(10, 5000, size=int(n)) for n in rng.integers(1, 60, size=40)]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    values = np.concatenate(seqs)

    calm = Embedder(str(tiny_embedding_model), dtype="float32", max_batch_tokens=4096, batch_overhead_tokens=10**6)
    expected = calm.embed_ids(values, offsets)

    tight = Embedder(str(tiny_embedding_model), dtype="float32", max_batch_tokens=4096, batch_overhead_tokens=10**6)
    forward = tight._forward

    def forward_with_limited_memory(seqs):
        if len(seqs) * max(len(s) for s in seqs) > 300:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(seqs)

    tight._forward = forward_with_limited_memory
    got = tight.embed_ids(values, offsets)
    assert tight.budget.halvings >= 1 and tight.max_batch_tokens <= 300
    assert tight.stats.rows == 40
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert np.all(np.abs(np.linalg.norm(got, axis=1) - 1) < 1e-5)
