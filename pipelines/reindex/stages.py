"""Ray Data stages of a reindex: content hashes and item digests, the per-file diff, the per-item carry.

A document's content hash is sha256 of the job fingerprint id and its text: equal hashes mean an equal
vector (same model, settings and text), so the vector is carried instead of computed. An item's content
digest is sha256 of its rows' sorted (id, content hash, pass-through values): equal digests mean that the
item's committed rows would be the same rows, so a new item whose digest equals a committed item's (of any
file name) keeps that item's files by reference.

No stage here shuffles. The diff compares the rows of one input file with the current version's rows of the
same file (a local join inside one task) and reports only what it cannot match there: documents new to the
file and documents gone from it. The driver matches those (a document that moved between files is one of
each) — their number follows the change, not the corpus. The build then carries each item's unchanged
vectors from the base files the driver names for it (the same file's, plus those its moved documents came
from), read inside the item's own task.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.tokenize import tokenize_batch
from common.columns import (
    CARRY_PREFIX,
    CONTENT_DIGEST,
    CONTENT_HASH,
    DIFF_JSON,
    ID,
    INPUT_IDS,
    ITEM,
    ITEM_JSON,
    N_TOKENS,
    READ_BOOKKEEPING,
    REJECT,
    TASK_JSON,
    TEXT,
    TOKENIZED,
    TRUNCATED,
)
from pipelines.embed.config import InputConfig
from pipelines.input.reading import read_items
from pipelines.stages import EVERY_COLUMN, stage
from pipelines.storage import Storage

CHANGE_KINDS = ("new", "changed", "unchanged", "deleted", "rejected")
CARRIED_COUNTS = (N_TOKENS, TRUNCATED)
"""What a carried row takes from the current version besides its vector columns."""
CARRY_N_TOKENS, CARRY_TRUNCATED = "_carry_n_tokens", "_carry_truncated"
"""Carried counts, internal to `carry_locally` (they never leave it)."""


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


def item_digest(rows: pa.Table, extra_columns: list[str]) -> str | None:
    """An item's content digest: sha256 over its rows' sorted `id NUL content_hash [NUL pass-through JSON]`.

    Sorted, so that rows reordered within an item still match; the pass-through values are part of it because
    a kept item keeps its old files' values. None (never kept by digest) where any row is rejected: a kept
    item's `_rejects/` file would name the old item and rows."""
    if rows.column(REJECT).null_count != rows.num_rows:
        return None
    ids, hashes = rows.column(ID).to_pylist(), rows.column(CONTENT_HASH).to_pylist()
    extras = [rows.column(c).to_pylist() for c in extra_columns]
    keys = sorted(f"{i}\x00{h}" + "".join("\x00" + json.dumps(e[n], sort_keys=True, default=str) for e in extras)
                  for n, (i, h) in enumerate(zip(ids, hashes)))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]


@stage(needs=(ITEM_JSON,), adds=(*READ_BOOKKEEPING, CONTENT_HASH), drops=EVERY_COLUMN)
def read_with_hash(batch: pa.Table, cfg: InputConfig, fingerprint_id: str) -> pa.Table:
    """Planned items in; their rows out (as `read_items`, with its `row_columns`) with `content_hash` (null for
    rejected rows)."""
    rows = read_items(batch, cfg)
    text = pc.if_else(rows.column(REJECT).is_valid(), pa.scalar(None, pa.string()), rows.column(TEXT))
    return rows.append_column(CONTENT_HASH, content_hashes(text, fingerprint_id))


def _item_rows(item: dict[str, Any], cfg: InputConfig, fingerprint_id: str) -> pa.Table:
    return read_with_hash(pa.table({ITEM_JSON: [json.dumps(item)]}), cfg, fingerprint_id)


@stage(needs=(ITEM_JSON,), adds=(ITEM, CONTENT_DIGEST), drops=EVERY_COLUMN)
def digest_items(batch: pa.Table, cfg: InputConfig, fingerprint_id: str) -> pa.Table:
    """Planned items in; per item, its id and content digest out (reading ids, texts and pass-through values)."""
    ids, digests = [], []
    for item in batch.column(ITEM_JSON).to_pylist():
        ids.append(json.loads(item)["item_id"])
        digests.append(item_digest(_item_rows(json.loads(item), cfg, fingerprint_id), cfg.extra_columns))
    return pa.table({ITEM: pa.array(ids, pa.string()), CONTENT_DIGEST: pa.array(digests, pa.string())})


def _read_file(storage: Storage, path: str, columns: list[str]) -> pa.Table:
    """Only `columns` of a committed file: the ids and hashes of a base file are read without its vectors."""
    with storage.fs.open(storage.path(path), "rb") as f:
        return pq.read_table(f, columns=columns)


def base_keys(storage: Storage, paths: list[str]) -> pa.Table:
    """(id, content_hash, file index into `paths`, row within that file) of the current version's files."""
    parts = []
    for n, path in enumerate(paths):
        t = _read_file(storage, path, [ID, CONTENT_HASH])
        parts.append(pa.table({ID: pc.cast(t.column(ID), pa.string()),
                               "_base_hash": pc.cast(t.column(CONTENT_HASH), pa.string()),
                               "_file": pa.array(np.full(t.num_rows, n, dtype=np.int64)),
                               "_pos": pa.array(np.arange(t.num_rows, dtype=np.int64))}))
    if not parts:
        return pa.table({ID: pa.array([], pa.string()), "_base_hash": pa.array([], pa.string()),
                         "_file": pa.array([], pa.int64()), "_pos": pa.array([], pa.int64())})
    return pa.concat_tables(parts)


@stage(needs=(TASK_JSON,), adds=(DIFF_JSON,), drops=EVERY_COLUMN)
def diff_file(batch: pa.Table, cfg: InputConfig, fingerprint_id: str, storage: Storage) -> pa.Table:
    """One input file's rebuilt items ⟗ the current version's rows of that file, on id, inside this task.

    Out: one JSON row: counts of unchanged, changed and rejected documents, and the documents matched on
    neither side: `new` [id, content hash, item] (new, or moved here from another file) and `gone`
    [id, content hash, base file] (deleted, or moved to another file); the driver tells those apart."""
    out = []
    for task in batch.column(TASK_JSON).to_pylist():
        task = json.loads(task)
        rejected, parts = 0, []
        for item in task["items"]:
            rows = _item_rows(item, cfg, fingerprint_id)
            rejected += rows.num_rows - rows.column(REJECT).null_count
            rows = rows.filter(rows.column(REJECT).is_null())
            parts.append(pa.table({ID: pc.cast(rows.column(ID), pa.string()), CONTENT_HASH: rows.column(CONTENT_HASH),
                                   ITEM: pa.array([item["item_id"]] * rows.num_rows, pa.string())}))
        new = pa.concat_tables(parts) if parts else pa.table({ID: pa.array([], pa.string()),
                                                              CONTENT_HASH: pa.array([], pa.string()),
                                                              ITEM: pa.array([], pa.string())})
        base = base_keys(storage, task["base_files"])
        joined = new.join(base, ID, join_type="full outer")
        in_new, in_base = joined.column(ITEM).is_valid(), joined.column("_file").is_valid()
        both = pc.and_(in_new, in_base)
        same = pc.fill_null(pc.equal(joined.column(CONTENT_HASH), joined.column("_base_hash")), False)
        only_new = joined.filter(pc.invert(in_base))
        only_base = joined.filter(pc.invert(in_new))
        paths = task["base_files"]
        out.append(json.dumps({
            "unchanged": pc.sum(pc.and_(both, same).cast(pa.int64())).as_py() or 0,
            "changed": pc.sum(pc.and_(both, pc.invert(same)).cast(pa.int64())).as_py() or 0,
            "rejected": rejected,
            "new": [list(r) for r in zip(*(only_new.column(c).to_pylist() for c in (ID, CONTENT_HASH, ITEM)))],
            "gone": [[i, h, paths[f]] for i, h, f in zip(*(only_base.column(c).to_pylist()
                                                             for c in (ID, "_base_hash", "_file")))],
        }))
    return pa.table({DIFF_JSON: pa.array(out, pa.string())})


def _carried(rows: pa.Table, storage: Storage, paths: list[str],
             vector_types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """Per row of `rows`: the base's vectors (every column of `vector_types`), token count and truncation flag
    where a base file listed in `paths` holds the same id with the same content hash (null elsewhere). Ids and hashes are read from every listed
    file; vectors only from the files that hold a match, and only the matched rows are kept."""
    n = rows.num_rows
    keys = pa.table({ID: pc.cast(rows.column(ID), pa.string()), "_base_hash": rows.column(CONTENT_HASH),
                     "_at": pa.array(np.arange(n, dtype=np.int64))}).filter(rows.column(REJECT).is_null())
    matched = keys.join(base_keys(storage, paths), [ID, "_base_hash"], join_type="inner")
    at = np.full(n, -1, dtype=np.int64)
    parts = []
    if matched.num_rows:  # a base holding an id twice matches a row twice: the first match is kept
        matched = matched.sort_by([("_at", "ascending"), ("_file", "ascending"), ("_pos", "ascending")])
        first = np.ones(matched.num_rows, dtype=bool)
        where = matched.column("_at").to_numpy()
        first[1:] = where[1:] != where[:-1]
        matched = matched.filter(pa.array(first)).sort_by([("_file", "ascending"), ("_pos", "ascending")])
        files, positions = matched.column("_file").to_numpy(), matched.column("_pos").to_numpy()
        at[matched.column("_at").to_numpy()] = np.arange(matched.num_rows)
        for f in np.unique(files):
            t = _read_file(storage, paths[int(f)], [*vector_types, *CARRIED_COUNTS])
            parts.append(t.take(pa.array(positions[files == f])))
    index = pa.array(at, mask=at < 0)
    if parts:
        vectors = pa.concat_tables(parts).combine_chunks()
        take = vectors.take(index)
        return {**{CARRY_PREFIX + c: take.column(c).combine_chunks().cast(t) for c, t in vector_types.items()},
                CARRY_N_TOKENS: take.column(N_TOKENS).combine_chunks(),
                CARRY_TRUNCATED: take.column(TRUNCATED).combine_chunks()}
    return {**{CARRY_PREFIX + c: pa.nulls(n, t) for c, t in vector_types.items()},
            CARRY_N_TOKENS: pa.nulls(n, pa.int32()), CARRY_TRUNCATED: pa.nulls(n, pa.bool_())}


def _tokenize_uncarried(table: pa.Table, tokenizer: dict[str, Any], first_carry: str) -> pa.Table:
    """Tokenise the rows that need the model; carried rows (`first_carry` set: every carried column is set on the
    same rows) get no tokens and keep their base's counts."""
    carried = table.column(first_carry).is_valid()
    todo = tokenize_batch(table.filter(pc.invert(carried)), **tokenizer)
    done = table.filter(carried).drop_columns([TEXT])
    done = (done.append_column(INPUT_IDS, pa.array([[]] * done.num_rows, todo.schema.field(INPUT_IDS).type))
            .append_column(N_TOKENS, pc.cast(done.column(CARRY_N_TOKENS), pa.int32()))
            .append_column(TRUNCATED, pc.cast(done.column(CARRY_TRUNCATED), pa.bool_())))
    out = pa.concat_tables([todo, done.select(todo.column_names)])
    return out.drop_columns([CARRY_N_TOKENS, CARRY_TRUNCATED])


@stage(needs=(TASK_JSON,), adds=(ID, *READ_BOOKKEEPING, CONTENT_HASH, *TOKENIZED), drops=EVERY_COLUMN)
def carry_locally(batch: pa.Table, cfg: InputConfig, fingerprint_id: str, storage: Storage,
                  vector_types: dict[str, pa.DataType], tokenizer: dict[str, Any]) -> pa.Table:
    """One item to rebuild in (with the base files to carry from); its rows out, unchanged documents carrying
    their vectors (`_carry_<column>` for each of `vector_types`, which the graph adds to the declaration) and
    the rest tokenised for the model. The local join on id replaces a
    cluster-wide shuffle: the base files are those of the item's own file plus any its moved documents came
    from (`pipelines.reindex.match`). Its rows keep the input's pass-through columns (the graph declares them)."""
    tables = []
    for task in batch.column(TASK_JSON).to_pylist():
        task = json.loads(task)
        rows = _item_rows(task["item"], cfg, fingerprint_id)
        for name, values in _carried(rows, storage, task["base_files"], vector_types).items():
            rows = rows.append_column(name, values)
        tables.append(_tokenize_uncarried(rows, tokenizer, CARRY_PREFIX + next(iter(vector_types))))
    return pa.concat_tables(tables)


@stage(needs=(ITEM_JSON,), adds=(ID, *READ_BOOKKEEPING, CONTENT_HASH, *TOKENIZED), drops=EVERY_COLUMN)
def read_hash_and_tokenize(batch: pa.Table, cfg: InputConfig, fingerprint_id: str,
                           tokenizer: dict[str, Any]) -> pa.Table:
    """Ray Data stage with no base to carry from (first version, or a changed model): read, hash, tokenise.
    Its rows keep the input's pass-through columns (which the graph adds to the declaration from the config)."""
    return tokenize_batch(read_with_hash(batch, cfg, fingerprint_id), **tokenizer)
