"""One Qwen3-Embedding replica: token ids in, normalised vectors out.

Plain Python and torch, no Ray: the pipeline turns `EmbedReplica` into an actor
pool, and tests call it directly.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from actors.batching import (BatchStats, padded_tokens, plan_micro_batches, right_pad,
                             row_padded_lengths)
from actors.loading import load_model, load_tokenizer, pad_id, placement, resolve_model_path
from actors.pooling import last_token_pool, normalize
from actors.tokenize import arrow_to_ids
from pipelines import failpoints  # dependency-free; inert unless a test names it
from pipelines.errors import ModelLoadError

VECTOR_TYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


class Embedder:
    """Runs the model on token id sequences, sorted and cut by a token budget, results in input order."""

    def __init__(self, path: str, revision: str | None = None, *, dtype: str = "auto", num_gpus: float = 0,
                 dimensions: int | None = None, max_batch_tokens: int = 16384, num_threads: int | None = None):
        self.device, self.dtype = placement(num_gpus, dtype, num_threads)
        tok = load_tokenizer(path, revision)
        self.pad_token_id = pad_id(tok)
        self.model = load_model(path, revision, self.dtype, self.device)
        self.hidden_size = int(self.model.config.hidden_size)
        if dimensions is not None and dimensions > self.hidden_size:
            raise ModelLoadError(
                f"model.dimensions={dimensions} exceeds the model's embedding size {self.hidden_size}"
            )
        self.dimensions = dimensions
        self.dim = dimensions or self.hidden_size
        self.max_batch_tokens = max_batch_tokens
        self.stats = BatchStats()

    @torch.inference_mode()
    def _forward(self, seqs: list[np.ndarray]) -> torch.Tensor:
        ids, mask = right_pad(seqs, self.pad_token_id)
        input_ids = torch.from_numpy(ids).to(self.device)
        attention_mask = torch.from_numpy(mask).to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return normalize(last_token_pool(hidden, attention_mask), self.dimensions)

    def embed_ids(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Vectors (float32, rows × dim) for sequences `values[offsets[i]:offsets[i+1]]`."""
        return self.embed_ids_padded(values, offsets)[0]

    def embed_ids_padded(self, values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`embed_ids` and, per row, the tokens computed for it with padding (for efficiency reports)."""
        n = len(offsets) - 1
        out = np.zeros((n, self.dim), dtype=np.float32)
        lengths = np.diff(offsets)
        todo = np.flatnonzero(lengths > 0)
        if len(todo) == 0:
            return out, np.zeros(n, dtype=np.int64)
        started = time.perf_counter()
        batches = [todo[b] for b in plan_micro_batches(lengths[todo], self.max_batch_tokens)]
        for rows in batches:
            seqs = [values[offsets[r] : offsets[r + 1]] for r in rows]
            out[rows] = self._forward(seqs).cpu().numpy()
        self.stats.rows += len(todo)
        self.stats.real_tokens += int(lengths[todo].sum())
        self.stats.padded_tokens += padded_tokens(lengths, batches)
        self.stats.forward_s += time.perf_counter() - started
        return out, row_padded_lengths(n, lengths, batches)


def vectors_to_arrow(vectors: np.ndarray, vector_dtype: str) -> pa.FixedSizeListArray:
    np_type, pa_type = VECTOR_TYPES[vector_dtype]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np_type).reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


class EmbedReplica:
    """Ray Data stage (actor): a table with `input_ids` in, the same rows with `embedding` out.

    Rows without tokens (rejected upstream) get a zero vector that the writer never stores.
    """

    def __init__(self, path: str, revision: str | None = None, *, dtype: str = "auto", num_gpus: float = 0,
                 num_cpus: float = 1, dimensions: int | None = None, max_batch_tokens: int = 16384,
                 vector_dtype: str = "float32", storage_options: dict | None = None,
                 model_digest: str | None = None):
        # a URL path is fetched once per node into the local model cache (storage_options: model.storage_options)
        path = resolve_model_path(path, storage_options, expected_digest=model_digest)
        self.embedder = Embedder(path, revision, dtype=dtype, num_gpus=num_gpus, dimensions=dimensions,
                                 max_batch_tokens=max_batch_tokens, num_threads=max(1, int(num_cpus)))
        self.vector_dtype = vector_dtype

    def __call__(self, table: pa.Table) -> pa.Table:
        failpoints.hit("replica_batch")
        values, offsets = arrow_to_ids(table.column("input_ids"))
        vectors, padded = self.embedder.embed_ids_padded(values, offsets)
        table = table.drop_columns(["input_ids"])
        return (table.append_column("embedding", vectors_to_arrow(vectors, self.vector_dtype))
                .append_column("_padded", pa.array(padded, pa.int64())))
