"""Tokenisation for the embedding recipe, run in CPU tasks ahead of the model replicas.

Truncation is the tokenizer's own: Qwen3-Embedding's post-processor appends
`<|endoftext|>` and `max_length` is counted with it, so the end token that
pooling reads survives truncation exactly as in the model card's recipe.

The tasks never import torch or transformers (about 400 MiB per worker process):
the driver gets the tokenizer as transformers configures it (`tokenizer_spec`, cached
by content) and the tasks rebuild that exact Rust tokenizer from its JSON with
`tokenizers` alone.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from actors.prompts import format_texts
from actors.tokenizer_cache import cached_spec
from common.columns import INPUT_IDS, N_TOKENS, REJECT, TEXT, TRUNCATED


def tokenizer_spec(path: str, revision: str | None = None) -> str:
    """The model's fast tokenizer as transformers configures it, serialised (JSON) for `TextTokenizer.from_spec`.

    Built once per model directory and transformers version (`actors.tokenizer_cache`): a driver with a cached
    spec imports neither transformers nor torch."""
    return cached_spec(path, revision, lambda: _transformers_spec(path, revision))


def _transformers_spec(path: str, revision: str | None) -> str:
    from actors.loading import load_tokenizer  # transformers (and torch): on a cache miss only

    return load_tokenizer(path, revision).backend_tokenizer.to_str()


def spec_digest(spec: str) -> str:
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


class TextTokenizer:
    """Texts → token ids (with the model's special tokens), lengths and truncation flags."""

    def __init__(self, path: str, revision: str | None, max_length: int, instruction: str | None):
        self._setup(tokenizer_spec(path, revision), max_length, instruction)

    @classmethod
    def from_spec(cls, spec: str, max_length: int, instruction: str | None) -> "TextTokenizer":
        self = cls.__new__(cls)
        self._setup(spec, max_length, instruction)
        return self

    def _setup(self, spec: str, max_length: int, instruction: str | None) -> None:
        self.instruction = instruction
        self.max_length = max_length
        self._backend = Tokenizer.from_str(spec)
        self._backend.no_padding()
        self._backend.enable_truncation(max_length=max_length)

    def encode(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        encodings = self._backend.encode_batch(format_texts(texts, self.instruction), add_special_tokens=True)
        ids = [e.ids for e in encodings]
        truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
        return ids, truncated


def ids_to_arrow(ids: list[list[int]]) -> pa.ListArray:
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def arrow_to_ids(column: pa.ChunkedArray | pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """Flat token values and row offsets of a list<int32> column, without per-row Python."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    base = offsets[0]
    return values[base : offsets[-1]], offsets - base


class TokenizeBatch:
    """Ray Data stage (CPU): adds `input_ids`, `n_tokens`, `truncated`; drops the text column.

    Rejected rows (non-null `_reject`) get no tokens.
    """

    def __init__(self, tokenizer: TextTokenizer, text_column: str = TEXT):
        self.tokenizer = tokenizer
        self.text_column = text_column

    def __call__(self, table: pa.Table) -> pa.Table:
        texts = table.column(self.text_column).to_pylist()
        rejected = table.column(REJECT).is_valid().to_numpy(zero_copy_only=False)
        keep = [i for i in range(len(texts)) if not rejected[i]]
        ids: list[list[int]] = [[] for _ in texts]
        truncated = np.zeros(len(texts), dtype=bool)
        if keep:
            enc, trunc = self.tokenizer.encode([texts[i] for i in keep])
            for i, e in zip(keep, enc):
                ids[i] = e
            truncated[keep] = trunc
        arr = ids_to_arrow(ids)
        n_tokens = np.diff(arr.offsets.to_numpy()).astype(np.int32)
        table = table.drop_columns([self.text_column])
        return (
            table.append_column(INPUT_IDS, arr)
            .append_column(N_TOKENS, pa.array(n_tokens))
            .append_column(TRUNCATED, pa.array(truncated))
        )


_STAGES: dict[tuple[str, int, str | None], TokenizeBatch] = {}


def tokenize_batch(table: pa.Table, *, spec: str, digest: str, max_length: int,
                   instruction: str | None) -> pa.Table:
    """Task-friendly form of `TokenizeBatch`: the tokenizer is built once per worker process and setting.

    `spec` and `digest` come from `tokenizer_spec` and `spec_digest`, run once on the driver."""
    key = (digest, max_length, instruction)
    if key not in _STAGES:
        if len(_STAGES) >= 4:
            _STAGES.clear()
        _STAGES[key] = TokenizeBatch(TextTokenizer.from_spec(spec, max_length, instruction))
    return _STAGES[key](table)
