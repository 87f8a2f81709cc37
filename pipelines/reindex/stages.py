"""Ray Data stages of a reindex: content hashes, the diff against the current version, carried vectors.

A document's content hash is sha256 of the job fingerprint id and its text: equal hashes mean an equal
vector (same model, settings and text), so the vector is carried instead of computed. The diff and the
carry are joins on `id` run on the cluster (`pipelines.graph`); the driver only sums counts.
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
from pipelines.config import InputConfig
from pipelines.input.reading import read_items
from pipelines.storage import Storage
from pipelines.output.pieces import CARRY

CHANGE_KINDS = ("new", "changed", "unchanged", "deleted", "rejected")


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


def read_with_hash(batch: pa.Table, cfg: InputConfig, fingerprint_id: str) -> pa.Table:
    """Planned items in; their rows out (as `read_items`) with `content_hash` (null for rejected rows)."""
    rows = read_items(batch, cfg)
    text = pc.if_else(rows.column("_reject").is_valid(), pa.scalar(None, pa.string()), rows.column("text"))
    return rows.append_column("content_hash", content_hashes(text, fingerprint_id))


def read_snapshot_keys(batch: pa.Table, cfg: InputConfig, fingerprint_id: str) -> pa.Table:
    """The snapshot side of the diff: (id, content_hash, _rejected, _in_snapshot). A rejected row gets a null id,
    so that it matches nothing: a document whose new text is unusable is gone from the new version."""
    rows = read_with_hash(batch, cfg, fingerprint_id)
    rejected = rows.column("_reject").is_valid()
    return pa.table({"id": pc.if_else(rejected, pa.scalar(None, pa.string()), rows.column("id")),
                     "content_hash": rows.column("content_hash"), "_rejected": rejected,
                     "_in_snapshot": pa.array(np.ones(rows.num_rows, dtype=bool))})


def _read_version_files(batch: pa.Table, storage: Storage, columns: list[str]) -> list[pa.Table]:
    return [pq.read_table(io.BytesIO(storage.read_bytes(p)), columns=columns) for p in batch.column("path").to_pylist()]


def read_base_keys(batch: pa.Table, storage: Storage) -> pa.Table:
    """The base side of the diff: committed files of the current version in; (id, _base_hash, _in_base) out."""
    tables = _read_version_files(batch, storage, ["id", "content_hash"])
    t = pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string()),
                                                           "content_hash": pa.array([], pa.string())})
    return pa.table({"id": t.column("id"), "_base_hash": t.column("content_hash"),
                     "_in_base": pa.array(np.ones(t.num_rows, dtype=bool))})


def read_base_vectors(batch: pa.Table, storage: Storage) -> pa.Table:
    """Committed files of the current version in; what a carried row needs, under `_base_*` names, out."""
    columns = ["id", "content_hash", "embedding", "n_tokens", "truncated"]
    t = pa.concat_tables(_read_version_files(batch, storage, columns))
    return pa.table({"id": t.column("id"), **{f"_base_{c}": t.column(c) for c in columns[1:]}})


def count_changes(joined: pa.Table) -> pa.Table:
    """Rows of snapshot ⟗ base (full outer join on id) in; one row of counts per kind out."""
    n = joined.num_rows

    def flag(name: str) -> np.ndarray:
        if name not in joined.column_names:
            return np.zeros(n, dtype=bool)
        return np.asarray(pc.fill_null(joined.column(name), False).to_numpy(zero_copy_only=False), dtype=bool)

    in_snapshot, in_base, rejected = flag("_in_snapshot"), flag("_in_base"), flag("_rejected")
    live = in_snapshot & ~rejected
    if in_base.any() and in_snapshot.any():
        same = np.asarray(pc.fill_null(pc.equal(joined.column("content_hash"), joined.column("_base_hash")),
                                       False).to_numpy(zero_copy_only=False), dtype=bool)
    else:
        same = np.zeros(n, dtype=bool)
    counts = {"new": live & ~in_base, "changed": live & in_base & ~same, "unchanged": live & in_base & same,
              "deleted": in_base & ~in_snapshot, "rejected": in_snapshot & rejected}
    return pa.table({k: pa.array([int(v.sum())], pa.int64()) for k, v in counts.items()})


def _carry_columns(group: pa.Table) -> pa.Table:
    """Per row: the base's vector, token count and truncation flag where the content hash is unchanged."""
    same = pc.fill_null(pc.equal(group.column("content_hash"), group.column("_base_content_hash")), False)
    null_of = lambda c: pa.nulls(group.num_rows, group.column(c).type)  # noqa: E731
    carried = {name: pc.if_else(same, group.column(f"_base_{c}"), null_of(f"_base_{c}"))
               for name, c in ((CARRY, "embedding"), ("_carry_n_tokens", "n_tokens"),
                               ("_carry_truncated", "truncated"))}
    group = group.drop_columns([c for c in group.column_names if c.startswith("_base_")])
    for name, values in carried.items():
        group = group.append_column(name, values)
    return group


def _tokenize_uncarried(table: pa.Table, tokenizer: dict[str, Any]) -> pa.Table:
    """Tokenise the rows that need the model; carried rows get no tokens and keep their base's counts."""
    if CARRY not in table.column_names:
        return tokenize_batch(table, **tokenizer)
    carried = table.column(CARRY).is_valid()
    todo = tokenize_batch(table.filter(pc.invert(carried)), **tokenizer)
    done = table.filter(carried).drop_columns(["text"])
    done = (done.append_column("input_ids", pa.array([[]] * done.num_rows, todo.schema.field("input_ids").type))
            .append_column("n_tokens", pc.cast(done.column("_carry_n_tokens"), pa.int32()))
            .append_column("truncated", done.column("_carry_truncated")))
    out = pa.concat_tables([todo, done.select(todo.column_names)])
    return out.drop_columns(["_carry_n_tokens", "_carry_truncated"])


def _regular_types(table: pa.Table) -> pa.Table:
    """The join hands strings back as large_string; the written files keep the input's plain types."""
    large = {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}
    fields = [pa.field(f.name, large.get(f.type, f.type), f.nullable) for f in table.schema]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def carry_or_tokenize(group: pa.Table, tokenizer: dict[str, Any]) -> pa.Table:
    """Ray Data stage (map_groups by `_item`, after snapshot ⟕ base on id): one item's rows in row order, with
    unchanged documents' vectors carried and the rest tokenised for the model. A base holding an id twice
    would repeat a row in the join; the repeat is dropped, so every input row stays exactly one row."""
    group = _regular_types(group).sort_by([("_row", "ascending"), ("_base_content_hash", "descending")])
    rows = group.column("_row").to_numpy()
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    return _tokenize_uncarried(_carry_columns(group.filter(pa.array(first))), tokenizer)


def read_hash_and_tokenize(batch: pa.Table, cfg: InputConfig, fingerprint_id: str,
                           tokenizer: dict[str, Any]) -> pa.Table:
    """Ray Data stage with no base to carry from (first version, or a changed model): read, hash, tokenise."""
    return tokenize_batch(read_with_hash(batch, cfg, fingerprint_id), **tokenizer)
