"""Pooling and normalisation of Qwen3-Embedding: last token, L2, Matryoshka truncation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whatever side the padding is on."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(dims=[1]).to(torch.int64).argmax(dim=1)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_positions(attention_mask).to(hidden.device)]


def normalize(vectors: torch.Tensor, dimensions: int | None = None) -> torch.Tensor:
    """L2-normalise in float32; with `dimensions`, keep the first N values then re-normalise (MRL)."""
    vectors = vectors.float()
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    return F.normalize(vectors, p=2, dim=1)
