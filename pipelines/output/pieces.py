"""Writing pieces: each contiguous run of one item's rows becomes one data file (and one rejects file), or
several where it exceeds the target file size.

File names carry the item, the row range, the writer's lease epoch and a content hash, so a re-executed
task either rewrites identical bytes under the same name or writes a new name; a committed file is never
overwritten with different content, and no two lock holders ever write the same path (`control.epoch_tag`).
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
from common.columns import CARRIED, CARRY_PREFIX, ITEM, ITEM_ROWS, N_TOKENS, REJECT, REPLICA_STARTUP, ROW
from pipelines.output.control import epoch_tag
from pipelines.output.field_ids import with_field_ids
from pipelines.output.records import FileRef, Piece
from pipelines.stages import EVERY_COLUMN, stage
from pipelines.storage import Storage

DATA_DIR = "data"
SCORES_DIR = "_scores"
REJECTS_DIR = "_rejects"
PIECE_DIRS = (DATA_DIR, SCORES_DIR, REJECTS_DIR)
FINGERPRINT_KEY = b"embedrank.fingerprint"

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
MAX_PARTITION_SEGMENT = 200


def length_histogram(n_tokens: np.ndarray) -> list[int]:
    """Rows per power-of-two length bucket: index k counts rows with 2^(k-1) < tokens ≤ 2^k."""
    if len(n_tokens) == 0:
        return []
    buckets = np.ceil(np.log2(np.maximum(np.asarray(n_tokens, dtype=np.float64), 1))).astype(np.int64)
    return np.bincount(buckets).tolist()


ROW_GROUP_BYTES = 128 * 1024 * 1024
"""Uncompressed bytes a row group aims at: readers fetch and decode a row group at a time (Parquet's own default
block size; DuckDB, Spark and Trino parallelise by row group)."""
MAX_ROW_GROUP_ROWS = 1 << 20


def row_bytes(table: pa.Table) -> float:
    """Uncompressed bytes per row (vectors barely compress, so this is close to a data file's share of a row)."""
    return table.nbytes / table.num_rows if table.num_rows else 0.0


def rows_within(table: pa.Table, max_bytes: float) -> int:
    """How many of the table's rows fit in `max_bytes` (at least one)."""
    per_row = row_bytes(table)
    return max(1, int(max_bytes // per_row)) if per_row else max(1, table.num_rows)


def _parquet_bytes(table: pa.Table, fingerprint_json: str | None) -> bytes:
    """The file's bytes: zstd, row groups of ~`ROW_GROUP_BYTES`, the job fingerprint in the key-value metadata
    (`None`: keep the table's own, as a merge of pieces that carry it does), and Iceberg's field ids on every
    column (`field_ids`: readers of the output's Iceberg table find the columns by id, not by name)."""
    if fingerprint_json is not None:
        meta = dict(table.schema.metadata or {})
        meta[FINGERPRINT_KEY] = fingerprint_json.encode()
        table = table.replace_schema_metadata(meta)
    table = pa.Table.from_arrays(table.columns, schema=with_field_ids(table.schema))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd",
                   row_group_size=min(MAX_ROW_GROUP_ROWS, rows_within(table, ROW_GROUP_BYTES)),
                   **_vector_encoding(table.schema))
    return buf.getvalue()


def _vector_encoding(schema: pa.Schema) -> dict:
    """Vector columns (fixed-size lists of floats, or of int8/uint8: quantised and packed-bit vectors) are
    written without a dictionary or statistics (neither can help random values: the dictionary is built, then
    dropped, per row group), and float32 values byte-stream-split, which zstd then compresses: for 1024-d
    float32 unit vectors ~9% smaller files, read 2.3-4.4x faster (`python -m benchmarks.file_layout`). Every other
    column keeps Parquet's defaults."""
    vectors = [f for f in schema if pa.types.is_fixed_size_list(f.type)
               and (pa.types.is_floating(f.type.value_type) or pa.types.is_int8(f.type.value_type)
                    or pa.types.is_uint8(f.type.value_type))]
    if not vectors:
        return {}
    others = [f.name for f in schema if f not in vectors]
    return {"use_dictionary": others, "write_statistics": others,
            "column_encoding": {f"{f.name}.list.element": "BYTE_STREAM_SPLIT" for f in vectors
                                if pa.types.is_float32(f.type.value_type)}}


def _matrix(vectors: pa.FixedSizeListArray) -> np.ndarray:
    """rows × dim values of a fixed-size list array, null slots included (their values are meaningless)."""
    dim = vectors.type.list_size
    flat = vectors.values.slice(vectors.offset * dim, len(vectors) * dim)
    return flat.to_numpy(zero_copy_only=False).reshape(-1, dim)


def use_carried_vectors(table: pa.Table) -> pa.Table:
    """Rows with carried vectors (`_carry_<column>` for each vector column: `_carry_embedding`, or each of
    `output.vectors`) take them as their `<column>` and are flagged `_carried`. Every carried column has the
    same valid rows (the carry sets all of a row's columns or none)."""
    carry = [c for c in table.column_names if c.startswith(CARRY_PREFIX)
             and c[len(CARRY_PREFIX):] in table.column_names]
    if not carry:
        return table
    mask = table.column(carry[0]).is_valid().to_numpy(zero_copy_only=False)
    for name in carry:
        column = name[len(CARRY_PREFIX):]
        carried = table.column(name)
        table = table.drop_columns([name])
        if not mask.any():
            continue
        emb = table.column(column).combine_chunks()
        values = _matrix(emb).copy()
        values[mask] = _matrix(carried.combine_chunks().cast(emb.type))[mask]
        fixed = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), emb.type.value_type),
                                                  emb.type.list_size)
        table = table.set_column(table.schema.get_field_index(column), column, fixed)
    return table.append_column(CARRIED, pa.array(mask))


def put_piece(storage: Storage, folder: str, stem: str, table: pa.Table, fingerprint_json: str | None,
              epoch: int = 0) -> FileRef:
    """Write one Parquet piece named by its writer's lease epoch and its content hash (`fingerprint_json`: see
    `_parquet_bytes`)."""
    data = _parquet_bytes(table, fingerprint_json)
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{folder}/{stem}-{epoch_tag(epoch)}-{digest[:12]}.parquet"
    storage.write_bytes(rel, data)
    return FileRef(path=rel, rows=table.num_rows, sha256=digest, bytes=len(data))


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
                      id_columns: tuple[str, ...], epoch: int = 0) -> Piece:
    """The `_rejects/` marker of a file rejected whole: one row, no ids or row (unknown), its reason and item."""
    marker = pa.table({**{c: pa.nulls(1, pa.string()) for c in id_columns}, "row": pa.nulls(1, pa.int64()),
                       "reason": [reason], "item": [item_id]})
    ref = put_piece(storage, REJECTS_DIR, f"{item_id}-file", marker, json.dumps(fingerprint, sort_keys=True), epoch)
    return Piece(item=item_id, start=0, end=0, item_rows=0, reject_file=ref)


def _file_runs(table: pa.Table, items: np.ndarray, rows: np.ndarray, target_file_bytes: float | None):
    """The batch's runs (`_runs`), each cut into slices whose data fits one file of `target_file_bytes`."""
    for lo, hi in _runs(items, rows):
        step = hi - lo if target_file_bytes is None else rows_within(table.slice(lo, hi - lo), target_file_bytes)
        for a in range(lo, hi, step):
            yield a, min(hi, a + step)


@stage(needs=(ITEM, ROW, ITEM_ROWS, REJECT, N_TOKENS), adds=Piece.ARROW_SCHEMA.names, drops=EVERY_COLUMN)
def write_pieces(table: pa.Table, storage: Storage, fingerprint: dict, output_columns: list[str],
                 data_dir: str = DATA_DIR, reject_id_columns: tuple[str, ...] = ("id",),
                 partition_by: str | None = None, target_file_bytes: float | None = None,
                 epoch: int = 0) -> pa.Table:
    """Write every run of the batch as pieces (a run larger than `target_file_bytes` as several), named as of the
    lease `epoch` of the driver that built the graph; return one record per piece for the driver's commit loop."""
    fingerprint_json = json.dumps(fingerprint, sort_keys=True)
    table = use_carried_vectors(table).sort_by([(ITEM, "ascending"), (ROW, "ascending")])
    items = np.asarray(table.column(ITEM).to_numpy(zero_copy_only=False))
    rows = table.column(ROW).to_numpy()
    pieces: list[Piece] = []
    for lo, hi in _file_runs(table.select(output_columns), items, rows, target_file_bytes):
        run = table.slice(lo, hi - lo)
        item, first, last = str(items[lo]), int(rows[lo]), int(rows[hi - 1])
        stem = f"{item}-{first}-{last}"
        folders = None
        if partition_by is not None:
            run, folders = _reject_unpartitionable(run, partition_by)
        rejected = run.column(REJECT).is_valid()
        good = run.filter(pa.compute.invert(rejected))
        bad = run.filter(rejected)
        if folders is not None:
            folders = [f for f, r in zip(folders, rejected.to_pylist()) if not r]
        failpoints.hit("before_piece_write")
        files = [put_piece(storage, posixpath.join(data_dir, folder) if folder else data_dir, stem,
                           part.select(output_columns), fingerprint_json, epoch)
                 for folder, part in (_by_partition(good, folders) if good.num_rows else [])]
        reject_file, reasons = None, {}
        if bad.num_rows:
            reject_file = put_piece(storage, REJECTS_DIR, stem,
                                    reject_table(bad, list(reject_id_columns), bad.column("_reject")), fingerprint_json,
                                    epoch)
            reasons = {r["values"]: r["counts"] for r in pa.compute.value_counts(bad.column("_reject")).to_pylist()}
        pieces.append(Piece(item=item, start=first, end=last + 1, item_rows=int(run.column("_item_rows")[0].as_py()),
                            data_files=tuple(files), reject_file=reject_file, reject_reasons=reasons,
                            tokens=_column_sum(good, "n_tokens"), padded_tokens=_column_sum(good, "_padded"),
                            length_hist=tuple(length_histogram(good.column("n_tokens").to_numpy())),
                            carried_rows=_column_sum(good, "_carried"), replica_startup=_startup_reports(run)))
    failpoints.hit("after_piece_write")
    return Piece.table(pieces)


def _startup_reports(run: pa.Table) -> tuple[dict, ...]:
    """The replicas' start-up reports among the rows (`actors.startup`: on a replica's first output batch only)."""
    if REPLICA_STARTUP not in run.column_names:
        return ()
    texts = pa.compute.unique(run.column(REPLICA_STARTUP).drop_null()).to_pylist()
    return tuple(json.loads(t) for t in sorted(texts))


def _column_sum(table: pa.Table, column: str) -> int:
    """The column's sum; 0 where a stage upstream does not report it."""
    if column not in table.column_names:
        return 0
    return int(pa.compute.sum(table.column(column)).as_py() or 0)
