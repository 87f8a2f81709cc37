"""One Qwen3-Reranker replica: (query, document) pairs in, P(yes) scores out.

The card's recipe computes full-vocabulary logits and keeps two of them. Here
the base model runs alone and only the hidden state at each row's last real
position meets the two `lm_head` rows for "no" and "yes": the same numbers at
a fraction of the cost. Candidates of one query share the system prompt,
instruction and query, so that token prefix runs once and its key/value cache
serves every candidate. Plain Python and torch, no Ray.
"""

from __future__ import annotations

from actors import startup  # first: it times this module's imports (torch, transformers) for the job summary

import dataclasses
import inspect
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from transformers import DynamicCache

from actors.batching import BatchStats, padded_tokens, pass_overhead_tokens, right_pad
from actors.budget import AdaptiveBudget, BudgetedModel
from actors.loading import load_causal_lm, load_tokenizer, pad_id, placement
from actors.rerank_prompts import ASSISTANT_SUFFIX, DEFAULT_INSTRUCTION, SYSTEM_PREFIX, format_pair
from actors.settings import RerankSettings
from common import failpoints  # dependency-free; inert unless a test names it
from common.columns import N_TOKENS, QUERY, QUERY_ID, REJECT, REPLICA_STARTUP, SCORE, TEXT, TRUNCATED
from common.errors import ModelLoadError
from common.model_cache import resolve_model_path

startup.imports_done()

MIN_SHARED_PREFIX = 16
"""A group whose candidates share fewer tokens than this is scored on the plain path."""


class PairTokenizer:
    """(query, document) pairs → the card's token ids: prefix + truncated user turn + suffix.

    The user turn is truncated by the tokenizer itself ('longest_first', on the
    tokenizer's truncation side, right for Qwen) to what `max_length` leaves
    after the prefix and suffix, so the document's end is cut and the suffix,
    whose last position is scored, always survives.
    """

    def __init__(self, path: str, revision: str | None, max_length: int, instruction: str | None = None):
        tok = load_tokenizer(path, revision)
        self.instruction = instruction if instruction is not None else DEFAULT_INSTRUCTION
        self.max_length = max_length
        self.prefix_ids = tok.encode(SYSTEM_PREFIX, add_special_tokens=False)
        self.suffix_ids = tok.encode(ASSISTANT_SUFFIX, add_special_tokens=False)
        room = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if room <= 0:
            raise ModelLoadError(
                f"max_length={max_length} leaves no room for the pair after the reranker's "
                f"{len(self.prefix_ids) + len(self.suffix_ids)} prompt tokens"
            )
        self._backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
        self._backend.no_padding()
        self._backend.enable_truncation(max_length=room, strategy="longest_first", direction=tok.truncation_side)

    def encode(self, queries: Sequence[str], docs: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per pair and whether the pair was truncated."""
        texts = [format_pair(self.instruction, q, d) for q, d in zip(queries, docs, strict=True)]
        encodings = self._backend.encode_batch(texts, add_special_tokens=True)
        ids = [self.prefix_ids + e.ids + self.suffix_ids for e in encodings]
        truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
        return ids, truncated


def answer_token_ids(tok, path: str) -> tuple[int, int]:
    """Ids of the "no" and "yes" tokens, looked up as the card does."""
    ids = tok.convert_tokens_to_ids(["no", "yes"])
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ModelLoadError(f"model.path {path!r}: the tokenizer has no 'yes'/'no' tokens; not a Qwen3 reranker")
    return int(ids[0]), int(ids[1])


def common_prefix_length(seqs: list[np.ndarray]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each after it."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        if n <= 0:
            return 0
        diff = np.flatnonzero(first[:n] != s[:n])
        if diff.size:
            n = int(diff[0])
    return max(n, 0)


def _as_sequences(seqs) -> list[np.ndarray]:
    """A list of id sequences, or a `(values, offsets)` tuple of flat arrays, as int64 arrays."""
    if isinstance(seqs, tuple):
        values, offsets = seqs
        values = np.asarray(values, dtype=np.int64)
        return [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return [np.asarray(s, dtype=np.int64) for s in seqs]


def _groups(keys: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """`rows` split by equal key, each part in row order."""
    _, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return [rows[part] for part in np.split(order, bounds)]


@dataclasses.dataclass
class RerankStats(BatchStats):
    shared_groups: int = 0
    prefix_tokens_saved: int = 0


class Reranker(BudgetedModel):
    """P(yes) per token sequence, sorted and cut by a token budget, results in input order.

    `score_ids(seqs, group)`: rows with the same `group` key (e.g. a query index)
    are candidates for prefix sharing. Their common token prefix is measured on
    the ids, so a wrong grouping costs speed, never correctness.
    """

    def __init__(self, path: str, revision: str | None = None, *, dtype: str = "auto", num_gpus: float = 0,
                 max_batch_tokens: int = 16384, num_threads: int | None = None, share_prefix: bool = True,
                 batch_overhead_tokens: int | None = None):
        self.device, self.dtype = placement(num_gpus, dtype, num_threads)
        tok = load_tokenizer(path, revision)
        self.pad_token_id = pad_id(tok)
        self.no_id, self.yes_id = answer_token_ids(tok, path)
        self.model = load_causal_lm(path, revision, self.dtype, self.device)
        self.base = self.model.model
        head = self.model.get_output_embeddings()
        rows = torch.tensor([self.no_id, self.yes_id], device=head.weight.device)
        self._answer_weight = head.weight.detach().index_select(0, rows)
        self._answer_bias = None if head.bias is None else head.bias.detach().index_select(0, rows)
        sliding = "sliding_attention" in (getattr(self.model.config, "layer_types", None) or ())
        self.share_prefix = share_prefix and not sliding
        params = inspect.signature(self.base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.budget = AdaptiveBudget(max_batch_tokens, pass_overhead_tokens(self.device.type, batch_overhead_tokens))
        self.stats = RerankStats()

    def _p_yes(self, last_hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(last_hidden, self._answer_weight, self._answer_bias).float()
        return torch.softmax(logits, dim=-1)[:, 1]

    def _last_hidden(self, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, torch.tensor(lengths, device=hidden.device) - 1]

    @torch.inference_mode()
    def _forward_plain(self, seqs: list[np.ndarray]) -> np.ndarray:
        ids, mask = right_pad(seqs, self.pad_token_id)
        hidden = self.base(input_ids=torch.from_numpy(ids).to(self.device),
                           attention_mask=torch.from_numpy(mask).to(self.device), use_cache=False).last_hidden_state
        return self._p_yes(self._last_hidden(hidden, [len(s) for s in seqs])).cpu().numpy()

    @torch.inference_mode()
    def _prefill(self, prefix: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of every layer for one shared prefix (batch of 1)."""
        cache = DynamicCache()
        self.base(input_ids=torch.from_numpy(prefix[None]).to(self.device), use_cache=True,
                  **{self._cache_kwarg: cache})
        return [(layer[0], layer[1]) for layer in cache]

    @torch.inference_mode()
    def _forward_after_prefix(self, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], prefix_len: int,
                              rests: list[np.ndarray]) -> np.ndarray:
        """Scores of rows that continue a cached prefix; each row's remainder is right-padded."""
        ids, rest_mask = right_pad(rests, self.pad_token_id)
        batch, width = ids.shape
        cache = DynamicCache()
        for layer_idx, (k, v) in enumerate(prefix_kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer_idx)
        mask = np.concatenate([np.ones((batch, prefix_len), dtype=np.int64), rest_mask], axis=1)
        positions = torch.arange(prefix_len, prefix_len + width, device=self.device).unsqueeze(0).expand(batch, -1)
        hidden = self.base(input_ids=torch.from_numpy(ids).to(self.device),
                           attention_mask=torch.from_numpy(mask).to(self.device), position_ids=positions,
                           use_cache=True, **{self._cache_kwarg: cache}).last_hidden_state
        return self._p_yes(self._last_hidden(hidden, [len(s) for s in rests])).cpu().numpy()

    def _score_plain(self, seqs: list[np.ndarray], rows: np.ndarray, out: np.ndarray) -> int:
        lengths = np.fromiter((len(seqs[r]) for r in rows), dtype=np.int64, count=len(rows))

        def compute(b: np.ndarray) -> None:
            out[rows[b]] = self._forward_plain([seqs[r] for r in rows[b]])

        return padded_tokens(lengths, self.budget.run(lengths, compute))

    def _score_shared(self, seqs: list[np.ndarray], rows: np.ndarray, prefix_len: int, out: np.ndarray) -> int:
        """The budget counts prefix + padded remainder per row: the span each row attends over."""
        prefix_kv = self._prefill(seqs[rows[0]][:prefix_len])
        rest_lengths = np.fromiter((len(seqs[r]) - prefix_len for r in rows), dtype=np.int64, count=len(rows))

        def compute(b: np.ndarray) -> None:
            out[rows[b]] = self._forward_after_prefix(prefix_kv, prefix_len, [seqs[r][prefix_len:] for r in rows[b]])

        return prefix_len + padded_tokens(rest_lengths, self.budget.run(rest_lengths + prefix_len, compute))

    def score_ids(self, seqs: list[Sequence[int]] | tuple[np.ndarray, np.ndarray],
                  group: np.ndarray | None = None) -> np.ndarray:
        """P(yes) (float32) per sequence in input order; empty sequences (rejected rows) score NaN.

        `seqs` is a list of id sequences or a `(values, offsets)` tuple. `group`
        (ints or strings, one per row) marks candidates that share a prompt prefix.
        """
        seqs = _as_sequences(seqs)
        if group is not None and len(group) != len(seqs):
            raise ValueError(f"group has {len(group)} keys for {len(seqs)} sequences")
        out = np.full(len(seqs), np.nan, dtype=np.float32)
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        todo = np.flatnonzero(lengths > 0)
        if len(todo) == 0:
            return out
        started = time.perf_counter()
        computed = 0
        plain = [todo]
        if self.share_prefix and group is not None:
            plain = []
            for rows in _groups(np.asarray(group)[todo], todo):
                shared = common_prefix_length([seqs[r] for r in rows]) if len(rows) > 1 else 0
                if shared < MIN_SHARED_PREFIX:
                    plain.append(rows)
                    continue
                computed += self._score_shared(seqs, rows, shared, out)
                self.stats.shared_groups += 1
                self.stats.prefix_tokens_saved += shared * (len(rows) - 1)
        plain_rows = np.concatenate(plain) if plain else todo[:0]
        if len(plain_rows):
            computed += self._score_plain(seqs, plain_rows, out)
        self.stats.rows += len(todo)
        self.stats.real_tokens += int(lengths[todo].sum())
        self.stats.padded_tokens += computed
        self.stats.forward_s += time.perf_counter() - started
        return out


class RerankReplica:
    """Ray Data stage (actor): rows with `query`, `text`, `query_id`, `_reject` in; `score` etc. out.

    Output is the input without `query`/`text`, plus `score` (float32, P(yes)),
    `n_tokens` (int32) and `truncated` (bool). Rejected rows (non-null
    `_reject`) and rows missing a query or text get no model work and score NaN.
    Candidates are grouped by `query_id` (by query text where it is null). The first output batch also carries
    the replica's start-up report (`actors.startup`), every later one nulls.
    """

    def __init__(self, settings: RerankSettings):
        self._startup = startup.StartupReport()
        s = settings
        path = resolve_model_path(s.path, s.storage_options, expected_digest=s.model_digest)  # URL: cached copy
        self.tokenizer = PairTokenizer(path, s.revision, s.max_length, s.instruction)
        self.reranker = Reranker(path, s.revision, dtype=s.dtype, num_gpus=s.num_gpus,
                                 max_batch_tokens=s.max_batch_tokens, num_threads=s.num_threads,
                                 share_prefix=s.share_prefix, batch_overhead_tokens=s.batch_overhead_tokens)
        self._startup.ready()

    def __call__(self, table: pa.Table) -> pa.Table:
        self._startup.arrived()
        failpoints.hit("replica_batch")
        queries = table.column(QUERY).to_pylist()
        texts = table.column(TEXT).to_pylist()
        query_ids = table.column(QUERY_ID).to_pylist()
        rejected = (table.column(REJECT).is_valid().to_numpy(zero_copy_only=False)
                    if REJECT in table.column_names else np.zeros(table.num_rows, dtype=bool))
        keep = [i for i in range(table.num_rows) if not rejected[i] and queries[i] is not None and texts[i] is not None]
        ids: list[list[int]] = [[] for _ in range(table.num_rows)]
        truncated = np.zeros(table.num_rows, dtype=bool)
        if keep:
            enc, trunc = self.tokenizer.encode([queries[i] for i in keep], [texts[i] for i in keep])
            for i, e in zip(keep, enc):
                ids[i] = e
            truncated[keep] = trunc
        codes: dict[tuple[int, str], int] = {}
        group = np.fromiter(
            (codes.setdefault((0, q) if q is not None else (1, query or ""), len(codes))
             for q, query in zip(query_ids, queries)),
            dtype=np.int64, count=table.num_rows,
        )
        scores = self.reranker.score_ids(ids, group)
        n_tokens = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
        return (
            table.drop_columns([QUERY, TEXT])
            .append_column(SCORE, pa.array(scores, type=pa.float32()))
            .append_column(N_TOKENS, pa.array(n_tokens))
            .append_column(TRUNCATED, pa.array(truncated))
            .append_column(REPLICA_STARTUP, self._startup.column(table.num_rows))
        )
