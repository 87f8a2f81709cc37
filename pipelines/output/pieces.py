"""Writing pieces: each contiguous run of one item's rows becomes one data file (and one rejects file).

File names carry the item, the row range and a content hash, so a re-executed
task either rewrites identical bytes under the same name or writes a new name;
a committed file is never overwritten with different content.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import urllib.parse

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from common import failpoints
from pipelines.storage import Storage

DATA_DIR = "data"
SCORES_DIR = "_scores"
REJECTS_DIR = "_rejects"
PIECE_DIRS = (DATA_DIR, SCORES_DIR, REJECTS_DIR)
FINGERPRINT_KEY = b"embedrank.fingerprint"
CARRY = "_carry_embedding"
"""Rows arriving with this column set keep that vector instead of the model's (a reindex's unchanged documents)."""

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
MAX_PARTITION_SEGMENT = 200

PIECE_SCHEMA = pa.schema([
    ("item", pa.string()), ("start", pa.int64()), ("end", pa.int64()), ("item_rows", pa.int64()),
    ("data_files", pa.string()), ("data_rows", pa.int64()), ("reject_file", pa.string()),
    ("reject_rows", pa.int64()), ("reject_sha256", pa.string()), ("reject_reasons", pa.string()),
    ("tokens", pa.int64()), ("padded_tokens", pa.int64()), ("length_hist", pa.string()),
    ("carried_rows", pa.int64()),
])
"""One record per piece: a contiguous run of one item's rows. `data_files` is a JSON list of
{path, rows, sha256, bytes} (one file per partition value; one file without partitioning).
`padded_tokens` counts the tokens computed with padding (0 where the stage does not report it) and
`length_hist` is a JSON list: rows whose token count is ≤ 1, 2, 4, … 2^k (see `length_histogram`).
`carried_rows` counts rows whose vector was carried from an older index version, not computed."""


def length_histogram(n_tokens: np.ndarray) -> list[int]:
    """Rows per power-of-two length bucket: index k counts rows with 2^(k-1) < tokens ≤ 2^k."""
    if len(n_tokens) == 0:
        return []
    buckets = np.ceil(np.log2(np.maximum(np.asarray(n_tokens, dtype=np.float64), 1))).astype(np.int64)
    return np.bincount(buckets).tolist()


def _parquet_bytes(table: pa.Table, fingerprint_json: str) -> bytes:
    meta = dict(table.schema.metadata or {})
    meta[FINGERPRINT_KEY] = fingerprint_json.encode()
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    return buf.getvalue()


def _matrix(vectors: pa.FixedSizeListArray) -> np.ndarray:
    """rows × dim values of a fixed-size list array, null slots included (their values are meaningless)."""
    dim = vectors.type.list_size
    flat = vectors.values.slice(vectors.offset * dim, len(vectors) * dim)
    return flat.to_numpy(zero_copy_only=False).reshape(-1, dim)


def use_carried_vectors(table: pa.Table) -> pa.Table:
    """Rows with a carried vector (`CARRY`) take it as their `embedding` and are flagged `_carried`."""
    if CARRY not in table.column_names:
        return table
    carried = table.column(CARRY)
    mask = carried.is_valid().to_numpy(zero_copy_only=False)
    table = table.drop_columns([CARRY]).append_column("_carried", pa.array(mask))
    if not mask.any():
        return table
    emb = table.column("embedding").combine_chunks()
    values = _matrix(emb).copy()
    values[mask] = _matrix(carried.combine_chunks())[mask]
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), emb.type.value_type), emb.type.list_size)
    return table.set_column(table.schema.get_field_index("embedding"), "embedding", fixed)


def put_piece(storage: Storage, folder: str, stem: str, table: pa.Table, fingerprint_json: str):
    """Write one Parquet piece named by its content hash; returns (path, sha256, bytes)."""
    data = _parquet_bytes(table, fingerprint_json)
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{folder}/{stem}-{digest[:12]}.parquet"
    storage.write_bytes(rel, data)
    return rel, digest, len(data)


def _runs(items: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) slices of the batch where the item is the same and row numbers are consecutive."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero((items[1:] != items[:-1]) | (rows[1:] != rows[:-1] + 1)) + 1
    bounds = np.concatenate([[0], breaks, [len(rows)]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def partition_folder(column: str, value: object) -> str:
    """`column=value` with the value percent-encoded as Hive and pyarrow (`segment_encoding="uri"`) decode it:
    no value can add a path level, climb out (`/`, `..`) or carry control characters into a key."""
    return f"{column}={HIVE_NULL if value is None else urllib.parse.quote(str(value), safe='')}"


def _reject_unpartitionable(run: pa.Table, column: str) -> tuple[pa.Table, list[str]]:
    """Each row's partition folder; rows whose folder is too long to be a path segment are rejected."""
    folders = [partition_folder(column, v) for v in run.column(column).to_pylist()]
    too_long = pa.array([len(f) > MAX_PARTITION_SEGMENT for f in folders])
    if pa.compute.any(too_long).as_py():
        reason = pa.compute.if_else(pa.compute.and_(too_long, run.column("_reject").is_null()),
                                    "partition_value_too_long", run.column("_reject"))
        run = run.set_column(run.schema.get_field_index("_reject"), "_reject", reason)
    return run, folders


def _by_partition(good: pa.Table, folders: list[str] | None) -> list[tuple[str, pa.Table]]:
    if folders is None:
        return [("", good)]
    groups: dict[str, list[int]] = {}
    for i, folder in enumerate(folders):
        groups.setdefault(folder, []).append(i)
    return [(f, good.take(pa.array(groups[f]))) for f in sorted(groups)]


def reject_table(rows: pa.Table, id_columns: list[str], reason: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The `_rejects/` schema: the row's id columns, its file row, the reason code, its item."""
    return pa.table({**{c: rows.column(c) for c in id_columns}, "row": rows.column("_row"),
                     "reason": reason, "item": rows.column("_item")})


def write_file_reject(storage: Storage, item_id: str, reason: str, fingerprint: dict,
                      id_columns: tuple[str, ...]) -> dict:
    """The `_rejects/` marker of a file rejected whole: one row, no ids or row (unknown), its reason and item."""
    marker = pa.table({**{c: pa.nulls(1, pa.string()) for c in id_columns}, "row": pa.nulls(1, pa.int64()),
                       "reason": [reason], "item": [item_id]})
    rel, digest, _ = put_piece(storage, REJECTS_DIR, f"{item_id}-file", marker, json.dumps(fingerprint, sort_keys=True))
    return {"item": item_id, "start": 0, "end": 0, "item_rows": 0, "data_files": "[]", "data_rows": 0,
            "reject_file": rel, "reject_rows": 1, "reject_sha256": digest, "reject_reasons": None, "tokens": 0,
            "padded_tokens": 0, "length_hist": "[]", "carried_rows": 0}


def write_pieces(table: pa.Table, storage: Storage, fingerprint: dict, output_columns: list[str],
                 data_dir: str = DATA_DIR, reject_id_columns: tuple[str, ...] = ("id",),
                 partition_by: str | None = None) -> pa.Table:
    """Write every run of the batch as pieces; return one record per piece for the driver's commit loop."""
    fingerprint_json = json.dumps(fingerprint, sort_keys=True)
    table = use_carried_vectors(table).sort_by([("_item", "ascending"), ("_row", "ascending")])
    items = np.asarray(table.column("_item").to_numpy(zero_copy_only=False))
    rows = table.column("_row").to_numpy()
    records = []
    for lo, hi in _runs(items, rows):
        run = table.slice(lo, hi - lo)
        item, first, last = str(items[lo]), int(rows[lo]), int(rows[hi - 1])
        stem = f"{item}-{first}-{last}"
        folders = None
        if partition_by is not None:
            run, folders = _reject_unpartitionable(run, partition_by)
        rejected = run.column("_reject").is_valid()
        good = run.filter(pa.compute.invert(rejected))
        bad = run.filter(rejected)
        if folders is not None:
            folders = [f for f, r in zip(folders, rejected.to_pylist()) if not r]
        record = {"item": item, "start": first, "end": last + 1,
                  "item_rows": int(run.column("_item_rows")[0].as_py()), "data_files": "[]",
                  "data_rows": good.num_rows, "reject_file": None, "reject_rows": 0, "reject_sha256": None,
                  "reject_reasons": None, "tokens": int(pa.compute.sum(good.column("n_tokens")).as_py() or 0),
                  "padded_tokens": int(pa.compute.sum(good.column("_padded")).as_py() or 0)
                  if "_padded" in good.column_names else 0,
                  "length_hist": json.dumps(length_histogram(good.column("n_tokens").to_numpy())),
                  "carried_rows": int(pa.compute.sum(good.column("_carried")).as_py() or 0)
                  if "_carried" in good.column_names else 0}
        failpoints.hit("before_piece_write")
        if good.num_rows:
            files = []
            for folder, part in _by_partition(good, folders):
                rel, digest, size = put_piece(storage, posixpath.join(data_dir, folder) if folder else data_dir,
                                              stem, part.select(output_columns), fingerprint_json)
                files.append({"path": rel, "rows": part.num_rows, "sha256": digest, "bytes": size})
            record["data_files"] = json.dumps(files)
        if bad.num_rows:
            rej = reject_table(bad, list(reject_id_columns), bad.column("_reject"))
            rel, digest, _ = put_piece(storage, REJECTS_DIR, stem, rej, fingerprint_json)
            reasons = pa.compute.value_counts(bad.column("_reject")).to_pylist()
            record.update(reject_file=rel, reject_rows=bad.num_rows, reject_sha256=digest,
                          reject_reasons=json.dumps({r["values"]: r["counts"] for r in reasons}, sort_keys=True))
        records.append(record)
    failpoints.hit("after_piece_write")
    return pa.Table.from_pylist(records, schema=PIECE_SCHEMA)
