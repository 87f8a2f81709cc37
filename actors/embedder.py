"""One Qwen3-Embedding replica: token ids in, normalised vectors out.

Plain Python and torch, no Ray: the pipeline turns `EmbedReplica` into an actor
pool, and tests call it directly.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from actors.batching import BatchStats, pass_overhead_tokens, right_pad, row_padded_lengths
from actors.budget import AdaptiveBudget, BudgetedModel
from actors.loading import flash_attention_available, load_model, load_tokenizer, pad_id, placement, resolve_model_path
from actors.pooling import last_token_pool, normalize
from actors.settings import EmbedSettings
from actors.tokenize import arrow_to_ids
from common import failpoints  # dependency-free; inert unless a test names it
from common.columns import EMBEDDING, INPUT_IDS, PADDED
from common.errors import ModelLoadError

VECTOR_TYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


class Embedder(BudgetedModel):
    """Runs the model on token id sequences, sorted and cut by a token budget, results in input order.

    `packed` (default: where FlashAttention-2 is installed, on a GPU, in bf16/fp16) concatenates a micro-batch's sequences
    into one row with per-sequence positions, so no padding is computed at all: transformers then runs
    variable-length attention (FlashAttention-2's varlen kernels; elsewhere, SDPA with a block-diagonal mask).
    """

    def __init__(self, path: str, revision: str | None = None, *, dtype: str = "auto", num_gpus: float = 0,
                 dimensions: int | None = None, max_batch_tokens: int = 16384, num_threads: int | None = None,
                 batch_overhead_tokens: int | None = None, packed: bool | None = None):
        self.device, self.dtype = placement(num_gpus, dtype, num_threads)
        tok = load_tokenizer(path, revision)
        self.pad_token_id = pad_id(tok)
        flash = flash_attention_available(self.device) and self.dtype in (torch.bfloat16, torch.float16)
        self.packed = flash if packed is None else packed
        self.model = load_model(path, revision, self.dtype, self.device,
                                "flash_attention_2" if self.packed and flash else None)
        self.hidden_size = int(self.model.config.hidden_size)
        if dimensions is not None and dimensions > self.hidden_size:
            raise ModelLoadError(
                f"model.dimensions={dimensions} exceeds the model's embedding size {self.hidden_size}"
            )
        self.dimensions = dimensions
        self.dim = dimensions or self.hidden_size
        self.budget = AdaptiveBudget(max_batch_tokens, pass_overhead_tokens(self.device.type, batch_overhead_tokens),
                                     packed=self.packed)
        self.stats = BatchStats()

    @torch.inference_mode()
    def _forward(self, seqs: list[np.ndarray]) -> torch.Tensor:
        ids, mask = right_pad(seqs, self.pad_token_id)
        input_ids = torch.from_numpy(ids).to(self.device)
        attention_mask = torch.from_numpy(mask).to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return normalize(last_token_pool(hidden, attention_mask), self.dimensions)

    @torch.inference_mode()
    def _forward_packed(self, seqs: list[np.ndarray]) -> torch.Tensor:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        ends = np.cumsum(lengths)
        positions = np.arange(ends[-1]) - np.repeat(ends - lengths, lengths)  # 0.. per sequence
        input_ids = torch.from_numpy(np.concatenate(seqs).astype(np.int64)[None]).to(self.device)
        position_ids = torch.from_numpy(positions[None]).to(self.device)
        hidden = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state[0]
        last = torch.from_numpy(ends - 1).to(self.device)
        return normalize(hidden.index_select(0, last), self.dimensions)

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

        forward = self._forward_packed if self.packed else self._forward

        def compute(rows: np.ndarray) -> None:
            rows = todo[rows]
            out[rows] = forward([values[offsets[r] : offsets[r + 1]] for r in rows]).cpu().numpy()

        batches = [todo[b] for b in self.budget.run(lengths[todo], compute)]
        computed = lengths.astype(np.int64) if self.packed else row_padded_lengths(n, lengths, batches)
        self.stats.rows += len(todo)
        self.stats.real_tokens += int(lengths[todo].sum())
        self.stats.padded_tokens += int(computed.sum())
        self.stats.forward_s += time.perf_counter() - started
        return out, computed


def vectors_to_arrow(vectors: np.ndarray, vector_dtype: str) -> pa.FixedSizeListArray:
    np_type, pa_type = VECTOR_TYPES[vector_dtype]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np_type).reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


class EmbedReplica:
    """Ray Data stage (actor): a table with `input_ids` in, the same rows with `embedding` out.

    Rows without tokens (rejected upstream) get a zero vector that the writer never stores.
    """

    def __init__(self, settings: EmbedSettings):
        s = settings
        path = resolve_model_path(s.path, s.storage_options, expected_digest=s.model_digest)  # URL: cached copy
        self.embedder = Embedder(path, s.revision, dtype=s.dtype, num_gpus=s.num_gpus, dimensions=s.dimensions,
                                 max_batch_tokens=s.max_batch_tokens, num_threads=s.num_threads,
                                 batch_overhead_tokens=s.batch_overhead_tokens)
        self.vector_dtype = s.vector_dtype

    def __call__(self, table: pa.Table) -> pa.Table:
        failpoints.hit("replica_batch")
        values, offsets = arrow_to_ids(table.column(INPUT_IDS))
        vectors, padded = self.embedder.embed_ids_padded(values, offsets)
        table = table.drop_columns([INPUT_IDS])
        return (table.append_column(EMBEDDING, vectors_to_arrow(vectors, self.vector_dtype))
                .append_column(PADDED, pa.array(padded, pa.int64())))
