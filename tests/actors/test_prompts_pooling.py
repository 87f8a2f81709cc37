"""Prompt format, last-token pooling on either padding side, normalisation and MRL."""

import torch

from actors.pooling import last_token_pool, last_token_positions, normalize
from actors.prompts import format_query, format_texts


def test_query_format_matches_the_card():
    assert format_query("Find docs", "What is Ray?") == "Instruct: Find docs\nQuery:What is Ray?"


def test_documents_pass_unchanged_and_queries_all_get_the_instruction():
    assert format_texts(["a", "b"], None) == ["a", "b"]
    assert format_texts(["a", "b"], "T") == ["Instruct: T\nQuery:a", "Instruct: T\nQuery:b"]


def test_last_token_positions_for_right_left_and_no_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_positions(right).tolist() == [2, 3, 0]
    assert last_token_positions(left).tolist() == [3, 3, 3]


def test_pooling_reads_the_same_token_whatever_the_padding_side():
    torch.manual_seed(0)
    seqs = [torch.randn(3, 8), torch.randn(5, 8), torch.randn(1, 8)]
    width = 5
    right = torch.zeros(3, width, 8)
    left = torch.zeros(3, width, 8)
    mask_r = torch.zeros(3, width, dtype=torch.long)
    mask_l = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        right[i, :n], mask_r[i, :n] = s, 1
        left[i, width - n :], mask_l[i, width - n :] = s, 1
    pooled_r = last_token_pool(right, mask_r)
    pooled_l = last_token_pool(left, mask_l)
    expected = torch.stack([s[-1] for s in seqs])
    assert torch.equal(pooled_r, expected)
    assert torch.equal(pooled_l, expected)


def test_normalize_gives_unit_vectors_and_mrl_renormalises_the_prefix():
    torch.manual_seed(1)
    v = torch.randn(4, 16) * 3
    full = normalize(v)
    assert torch.allclose(full.norm(dim=1), torch.ones(4), atol=1e-6)
    cut = normalize(v, 6)
    assert cut.shape == (4, 6)
    assert torch.allclose(cut.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(cut, v[:, :6] / v[:, :6].norm(dim=1, keepdim=True), atol=1e-6)
    assert not torch.allclose(cut, full[:, :6])
