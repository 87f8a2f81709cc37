"""Ray Data stages of a reindex: content hashes, the diff against the current version, carried vectors.

A document's content hash is sha256 of the job fingerprint id and its text: equal hashes mean an equal
vector (same model, settings and text), so the vector is carried instead of computed. The diff and the
carry are joins on `id` run on the cluster (`pipelines/reindex/graph.py`); the driver only sums counts.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.tokenize import tokenize_batch
from common.columns import (BASE_HASH, BASE_PREFIX, CARRY_EMBEDDING, CONTENT_HASH, EMBEDDING, ID, IN_BASE, IN_SNAPSHOT,
                            INPUT_IDS, ITEM_JSON, N_TOKENS, PATH, READ_BOOKKEEPING, REJECT, REJECTED, ROW, TEXT,
                            TOKENIZED, TRUNCATED)
from pipelines.embed.config import InputConfig
from pipelines.input.reading import read_items
from pipelines.stages import EVERY_COLUMN, stage
from pipelines.storage import Storage

CHANGE_KINDS = ("new", "changed", "unchanged", "deleted", "rejected")
CARRIED_FROM_BASE = (CONTENT_HASH, EMBEDDING, N_TOKENS, TRUNCATED)
"""What a carried row takes from the current version, joined in as `_base_<column>`."""
BASE_VECTOR_COLUMNS = tuple(BASE_PREFIX + c for c in CARRIED_FROM_BASE)
BASE_CONTENT_HASH = BASE_PREFIX + CONTENT_HASH
CARRY_N_TOKENS, CARRY_TRUNCATED = "_carry_n_tokens", "_carry_truncated"
"""Carried counts, internal to `carry_or_tokenize` (they never leave it)."""


def content_hashes(texts: pa.ChunkedArray | pa.Array, fingerprint_id: str) -> pa.Array:
    """Per row, the first 16 bytes (hex) of sha256(fingerprint id, NUL, text); null where the text is null."""
    prefix = hashlib.sha256(fingerprint_id.encode() + b"\x00")
    out: list[str | None] = []
    for text in texts.to_pylist():
        if text is None:
            out.append(None)
            continue
        h = prefix.copy()
        h.update(text.encode())
        out.append(h.hexdigest()[:32])
    return pa.array(out, pa.string())


@stage(needs=(ITEM_JSON,), adds=(*READ_BOOKKEEPING, CONTENT_HASH), drops=EVERY_COLUMN)
def read_with_hash(batch: pa.Table, cfg: InputConfig, fingerprint_id: str) -> pa.Table:
    """Planned items in; their rows out (as `read_items`, with its `row_columns`) with `content_hash` (null for
    rejected rows)."""
    rows = read_items(batch, cfg)
    text = pc.if_else(rows.column(REJECT).is_valid(), pa.scalar(None, pa.string()), rows.column(TEXT))
    return rows.append_column(CONTENT_HASH, content_hashes(text, fingerprint_id))


@stage(needs=(ITEM_JSON,), adds=(ID, CONTENT_HASH, REJECTED, IN_SNAPSHOT), drops=EVERY_COLUMN)
def read_snapshot_keys(batch: pa.Table, cfg: InputConfig, fingerprint_id: str) -> pa.Table:
    """The snapshot side of the diff: (id, content_hash, _rejected, _in_snapshot). A rejected row gets a null id,
    so that it matches nothing: a document whose new text is unusable is gone from the new version."""
    rows = read_with_hash(batch, cfg, fingerprint_id)
    rejected = rows.column(REJECT).is_valid()
    return pa.table({ID: pc.if_else(rejected, pa.scalar(None, pa.string()), rows.column(ID)),
                     CONTENT_HASH: rows.column(CONTENT_HASH), REJECTED: rejected,
                     IN_SNAPSHOT: pa.array(np.ones(rows.num_rows, dtype=bool))})


def _read_version_files(batch: pa.Table, storage: Storage, columns: list[str]) -> list[pa.Table]:
    return [pq.read_table(io.BytesIO(storage.read_bytes(p)), columns=columns) for p in batch.column(PATH).to_pylist()]


@stage(needs=(PATH,), adds=(ID, BASE_HASH, IN_BASE), drops=EVERY_COLUMN)
def read_base_keys(batch: pa.Table, storage: Storage) -> pa.Table:
    """The base side of the diff: committed files of the current version in; (id, _base_hash, _in_base) out."""
    tables = _read_version_files(batch, storage, [ID, CONTENT_HASH])
    t = pa.concat_tables(tables) if tables else pa.table({ID: pa.array([], pa.string()),
                                                           CONTENT_HASH: pa.array([], pa.string())})
    return pa.table({ID: t.column(ID), BASE_HASH: t.column(CONTENT_HASH),
                     IN_BASE: pa.array(np.ones(t.num_rows, dtype=bool))})


@stage(needs=(PATH,), adds=(ID, *BASE_VECTOR_COLUMNS), drops=EVERY_COLUMN)
def read_base_vectors(batch: pa.Table, storage: Storage) -> pa.Table:
    """Committed files of the current version in; what a carried row needs, under `_base_*` names, out."""
    t = pa.concat_tables(_read_version_files(batch, storage, [ID, *CARRIED_FROM_BASE]))
    return pa.table({ID: t.column(ID), **{BASE_PREFIX + c: t.column(c) for c in CARRIED_FROM_BASE}})


@stage(adds=CHANGE_KINDS, drops=EVERY_COLUMN)
def count_changes(joined: pa.Table) -> pa.Table:
    """Rows of snapshot ⟗ base (full outer join on id) in; one row of counts per kind out.

    Needs no column: either side of the join may be absent (a first version, an empty snapshot)."""
    n = joined.num_rows

    def flag(name: str) -> np.ndarray:
        if name not in joined.column_names:
            return np.zeros(n, dtype=bool)
        return np.asarray(pc.fill_null(joined.column(name), False).to_numpy(zero_copy_only=False), dtype=bool)

    in_snapshot, in_base, rejected = flag(IN_SNAPSHOT), flag(IN_BASE), flag(REJECTED)
    live = in_snapshot & ~rejected
    if in_base.any() and in_snapshot.any():
        same = np.asarray(pc.fill_null(pc.equal(joined.column(CONTENT_HASH), joined.column(BASE_HASH)),
                                       False).to_numpy(zero_copy_only=False), dtype=bool)
    else:
        same = np.zeros(n, dtype=bool)
    counts = {"new": live & ~in_base, "changed": live & in_base & ~same, "unchanged": live & in_base & same,
              "deleted": in_base & ~in_snapshot, "rejected": in_snapshot & rejected}
    return pa.table({k: pa.array([int(v.sum())], pa.int64()) for k, v in counts.items()})


def _carry_columns(group: pa.Table) -> pa.Table:
    """Per row: the base's vector, token count and truncation flag where the content hash is unchanged."""
    same = pc.fill_null(pc.equal(group.column(CONTENT_HASH), group.column(BASE_CONTENT_HASH)), False)
    null_of = lambda c: pa.nulls(group.num_rows, group.column(c).type)  # noqa: E731
    carried = {name: pc.if_else(same, group.column(BASE_PREFIX + c), null_of(BASE_PREFIX + c))
               for name, c in ((CARRY_EMBEDDING, EMBEDDING), (CARRY_N_TOKENS, N_TOKENS),
                               (CARRY_TRUNCATED, TRUNCATED))}
    group = group.drop_columns([c for c in group.column_names if c.startswith(BASE_PREFIX)])
    for name, values in carried.items():
        group = group.append_column(name, values)
    return group


def _tokenize_uncarried(table: pa.Table, tokenizer: dict[str, Any]) -> pa.Table:
    """Tokenise the rows that need the model; carried rows get no tokens and keep their base's counts."""
    if CARRY_EMBEDDING not in table.column_names:
        return tokenize_batch(table, **tokenizer)
    carried = table.column(CARRY_EMBEDDING).is_valid()
    todo = tokenize_batch(table.filter(pc.invert(carried)), **tokenizer)
    done = table.filter(carried).drop_columns([TEXT])
    done = (done.append_column(INPUT_IDS, pa.array([[]] * done.num_rows, todo.schema.field(INPUT_IDS).type))
            .append_column(N_TOKENS, pc.cast(done.column(CARRY_N_TOKENS), pa.int32()))
            .append_column(TRUNCATED, done.column(CARRY_TRUNCATED)))
    out = pa.concat_tables([todo, done.select(todo.column_names)])
    return out.drop_columns([CARRY_N_TOKENS, CARRY_TRUNCATED])


def _regular_types(table: pa.Table) -> pa.Table:
    """The join hands strings back as large_string; the written files keep the input's plain types."""
    large = {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}
    fields = [pa.field(f.name, large.get(f.type, f.type), f.nullable) for f in table.schema]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


@stage(needs=(ROW, REJECT, TEXT, CONTENT_HASH, *BASE_VECTOR_COLUMNS), adds=(CARRY_EMBEDDING, *TOKENIZED),
       drops=(TEXT, *BASE_VECTOR_COLUMNS))
def carry_or_tokenize(group: pa.Table, tokenizer: dict[str, Any]) -> pa.Table:
    """Ray Data stage (map_groups by `_item`, after snapshot ⟕ base on id): one item's rows in row order, with
    unchanged documents' vectors carried and the rest tokenised for the model. A base holding an id twice
    would repeat a row in the join; the repeat is dropped, so every input row stays exactly one row."""
    group = _regular_types(group).sort_by([(ROW, "ascending"), (BASE_CONTENT_HASH, "descending")])
    rows = group.column(ROW).to_numpy()
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    return _tokenize_uncarried(_carry_columns(group.filter(pa.array(first))), tokenizer)


@stage(needs=(ITEM_JSON,), adds=(ID, *READ_BOOKKEEPING, CONTENT_HASH, *TOKENIZED), drops=EVERY_COLUMN)
def read_hash_and_tokenize(batch: pa.Table, cfg: InputConfig, fingerprint_id: str,
                           tokenizer: dict[str, Any]) -> pa.Table:
    """Ray Data stage with no base to carry from (first version, or a changed model): read, hash, tokenise.
    Its rows keep the input's pass-through columns (which the graph adds to the declaration from the config)."""
    return tokenize_batch(read_with_hash(batch, cfg, fingerprint_id), **tokenizer)
