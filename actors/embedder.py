"""One Qwen3-Embedding replica: token ids in, normalised vectors out.

Plain Python and torch, no Ray: the pipeline turns `EmbedReplica` into an actor
pool, and tests call it directly.
"""

from __future__ import annotations

from actors import startup  # first: it times this module's imports (torch, transformers) for the job summary

import contextlib
import dataclasses
import time

import numpy as np
import pyarrow as pa
import torch

from actors.attention import cu_seqlens, kernel_name, packed_kernel_works, packed_positions, register
from actors.batching import MIN_BUCKET_TOKENS, BatchStats, packed_row_tokens, pass_overhead_tokens, right_pad
from actors.budget import AdaptiveBudget, BudgetedModel
from actors.loading import config_pad_id, load_model, placement
from actors.pooling import last_token_pool, normalize
from actors.quantize import CALIBRATED, vector_columns
from actors.settings import EmbedSettings
from actors.tokenize import arrow_to_ids
from common import failpoints  # dependency-free; inert unless a test names it
from common.columns import EMBEDDING, INPUT_IDS, PADDED, REPLICA_STARTUP
from common.errors import ModelLoadError
from common.model_cache import resolve_model_path

startup.imports_done()

VECTOR_TYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


class Embedder(BudgetedModel):
    """Runs the model on token id sequences, sorted and cut by a token budget, results in input order.

    `packed` concatenates a micro-batch's sequences into one row with per-sequence positions (RoPE restarts
    at 0) and runs attention on variable-length kernels (`actors.attention`: PyTorch's FlashAttention varlen,
    or the `flash_attn` package, on a GPU; SDPA with a block-diagonal mask elsewhere), so no padding is
    computed. Default: packed where such a kernel works (a GPU in bf16/fp16), padded batches elsewhere.
    `token_buckets` pads each packed micro-batch up to one of a few fixed token counts so shapes repeat.
    Only each sequence's last hidden state goes through the final norm and pooling.
    """

    def __init__(self, path: str, revision: str | None = None, *, dtype: str = "auto", num_gpus: float = 0,
                 dimensions: int | None = None, max_batch_tokens: int = 16384, num_threads: int | None = None,
                 batch_overhead_tokens: int | None = None, packed: bool | None = None,
                 token_buckets: bool = False):
        self.device, self.dtype = placement(num_gpus, dtype, num_threads)
        self.packed = packed_kernel_works(self.device.type, self.dtype) if packed is None else packed
        self.model = load_model(path, revision, self.dtype, self.device, register() if self.packed else None)
        self.pad_token_id = config_pad_id(self.model.config)  # no tokenizer here: ids come tokenized
        if self.packed and "sliding_attention" in (getattr(self.model.config, "layer_types", None) or ()):
            if packed:
                raise ModelLoadError(f"model.path {path!r}: packed batches do not support sliding-window layers")
            self.model.set_attn_implementation("sdpa")
            self.packed = False
        self.attention = kernel_name(self.device, self.dtype) if self.packed else "padded"
        """What runs attention: torch_varlen, flash_attn, sdpa_reference (packed), or padded (SDPA)."""
        self.hidden_size = int(self.model.config.hidden_size)
        if dimensions is not None and dimensions > self.hidden_size:
            raise ModelLoadError(
                f"model.dimensions={dimensions} exceeds the model's embedding size {self.hidden_size}"
            )
        self.dimensions = dimensions
        self.dim = dimensions or self.hidden_size
        self.budget = AdaptiveBudget(max_batch_tokens, pass_overhead_tokens(self.device.type, batch_overhead_tokens),
                                     packed=self.packed,
                                     min_bucket=MIN_BUCKET_TOKENS if self.packed and token_buckets else None)
        self.stats = BatchStats()

    @torch.inference_mode()
    def _forward(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, int]:
        """Vectors of one right-padded micro-batch, and the token positions it computed (rows × longest)."""
        ids, mask = right_pad(seqs, self.pad_token_id)
        input_ids = torch.from_numpy(ids).to(self.device)
        attention_mask = torch.from_numpy(mask).to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return normalize(last_token_pool(hidden, attention_mask), self.dimensions), int(ids.size)

    @torch.inference_mode()
    def _forward_packed(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, int]:
        """Vectors of one packed micro-batch, and the token positions it computed: its real tokens, plus, with
        token buckets, a padding sequence that fills the bucket (it attends only to itself; its output is
        dropped)."""
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        n_docs = len(seqs)
        fill = self.budget.cost(lengths) - int(lengths.sum())
        if fill > 0:
            seqs = [*seqs, np.full(fill, self.pad_token_id, dtype=np.int64)]
            lengths = np.append(lengths, fill)
        cu = cu_seqlens(lengths)
        input_ids = torch.from_numpy(np.concatenate(seqs).astype(np.int64)[None]).to(self.device)
        position_ids = torch.from_numpy(packed_positions(lengths)[None]).to(self.device)
        cu_t = torch.from_numpy(cu).to(self.device)
        last = torch.from_numpy(cu[1 : n_docs + 1].astype(np.int64) - 1).to(self.device)
        with self._last_tokens_only(last):
            hidden = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_t, max_length_q=int(lengths.max()),
                                max_length_k=int(lengths.max())).last_hidden_state[0]
        if hidden.shape[0] != len(last):  # a model without a final `norm` to hook: select here
            hidden = hidden.index_select(0, last)
        return normalize(hidden, self.dimensions), int(input_ids.shape[1])

    @contextlib.contextmanager
    def _last_tokens_only(self, last: torch.Tensor):
        """While active, the model's final norm (and so its output) sees only the positions `last`."""
        norm = getattr(self.model, "norm", None)
        if not isinstance(norm, torch.nn.Module):
            yield
            return
        def select(_module, args, kwargs):
            if args:
                return (args[0].index_select(1, last), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].index_select(1, last)}

        handle = norm.register_forward_pre_hook(select, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def embed_ids(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Vectors (float32, rows × dim) for sequences `values[offsets[i]:offsets[i+1]]`."""
        return self.embed_ids_padded(values, offsets)[0]

    def embed_ids_padded(self, values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`embed_ids` and, per row, the tokens computed for it (for efficiency reports), as measured on the
        tensors that ran: padded, its micro-batch's width; packed, its length plus its share of the bucket's
        padding. They sum to the tokens computed."""
        n = len(offsets) - 1
        out = np.zeros((n, self.dim), dtype=np.float32)
        lengths = np.diff(offsets)
        todo = np.flatnonzero(lengths > 0)
        if len(todo) == 0:
            return out, np.zeros(n, dtype=np.int64)
        started = time.perf_counter()

        forward = self._forward_packed if self.packed else self._forward
        computed: list[int] = []  # per micro-batch that ran, in the order they ran

        def compute(rows: np.ndarray) -> None:
            rows = todo[rows]
            vectors, tokens = forward([values[offsets[r] : offsets[r + 1]] for r in rows])
            out[rows] = vectors.cpu().numpy()
            computed.append(tokens)

        batches = [todo[b] for b in self.budget.run(lengths[todo], compute)]
        if self.packed:
            per_row = packed_row_tokens(n, lengths, batches, computed)
        else:
            per_row = np.zeros(n, dtype=np.int64)
            for b, tokens in zip(batches, computed):
                per_row[b] = tokens // len(b)
        self.stats.rows += len(todo)
        self.stats.real_tokens += int(lengths[todo].sum())
        self.stats.padded_tokens += int(sum(computed))
        self.stats.forward_s += time.perf_counter() - started
        return out, per_row


def vectors_to_arrow(vectors: np.ndarray, vector_dtype: str) -> pa.FixedSizeListArray:
    np_type, pa_type = VECTOR_TYPES[vector_dtype]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np_type).reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


class EmbedReplica:
    """Ray Data stage (actor): a table with `input_ids` in, the same rows with `embedding` out (or, with
    `settings.vectors`, each configured column, all from the one pooled vector: `actors.quantize`).

    Rows without tokens (rejected upstream) get a zero vector that the writer never stores. The first output
    batch also carries the replica's start-up report (`actors.startup`), every later one nulls.
    """

    def __init__(self, settings: EmbedSettings):
        self._startup = startup.StartupReport()
        s = settings
        path = resolve_model_path(s.path, s.storage_options, expected_digest=s.model_digest)  # URL: cached copy
        self.embedder = Embedder(path, s.revision, dtype=s.dtype, num_gpus=s.num_gpus, dimensions=s.dimensions,
                                 max_batch_tokens=s.max_batch_tokens, num_threads=s.num_threads,
                                 batch_overhead_tokens=s.batch_overhead_tokens, packed=s.packed,
                                 token_buckets=s.token_buckets)
        self.vector_dtype = s.vector_dtype
        self.vectors = None
        if s.vectors is not None:
            self.vectors = [dataclasses.replace(v, dimensions=v.dimensions or self.embedder.dim) for v in s.vectors]
            too_wide = [v.column for v in self.vectors if v.dimensions > self.embedder.dim]
            if too_wide:
                raise ModelLoadError(f"vectors {too_wide}: dimensions exceed the pooled width {self.embedder.dim}")
            uncalibrated = [v.column for v in self.vectors if v.dtype in CALIBRATED and v.ranges is None]
            if uncalibrated:
                raise ModelLoadError(f"vectors {uncalibrated}: int8/uint8 columns need calibration ranges")
        self._startup.ready()

    def __call__(self, table: pa.Table) -> pa.Table:
        self._startup.arrived()
        failpoints.hit("replica_batch")
        values, offsets = arrow_to_ids(table.column(INPUT_IDS))
        vectors, padded = self.embedder.embed_ids_padded(values, offsets)
        table = table.drop_columns([INPUT_IDS])
        if self.vectors is None:
            table = table.append_column(EMBEDDING, vectors_to_arrow(vectors, self.vector_dtype))
        else:
            for name, column in vector_columns(vectors, self.vectors).items():
                table = table.append_column(name, column)
        return (table.append_column(PADDED, pa.array(padded, pa.int64()))
                .append_column(REPLICA_STARTUP, self._startup.column(table.num_rows)))
