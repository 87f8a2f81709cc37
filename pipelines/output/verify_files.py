"""The checks `embedrank verify` runs on each committed file, and the duplicate-key counting, for both engines.

`check_file` reads one file a commit names: its bytes against the recorded sha256, its row count against the
record, what its role requires (a file-reject marker's reason; in a rank file, ranks 1..n per query, n ≤ top_k,
no pair twice) and returns its row keys by kind: `id` (embedding ids, data and rejects: O ∩ R = ∅), `row`
(`<item>:<row>`, every input row of rerank scores and of rejects) and `query` (each query id once per rank file:
a query in two rank buckets is a duplicate). The local engine counts keys exactly (`count_keys`); the ray engine
runs `check_file_stage` per file and `group_keys_stage` per hash bucket (`pipelines.graph.verify_graph`), which
compares exact keys only where 64-bit hashes collide. Both give the same numbers, so the same Report.

Ray imports this module in its workers: it imports no torch and no Ray.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.output import vector_schema
from pipelines.output.records import FileRef
from pipelines.stages import EVERY_COLUMN, stage
from pipelines.storage import Storage
from pipelines import parquet_bytes

KEY_KINDS = ("id", "row", "query")

VERIFY_FILE = "_verify_file"
"""One file to check (`Named.to_json`), where the ray engine's graph starts."""
KEY_BUCKET = "_key_bucket"
"""The hash bucket of a row key; `FILE_BUCKET` on the one row per file that carries its result."""
KEY_HASH = "_key_hash"
KEY_KIND = "_key_kind"
KEY = "_key"
FILE_RESULT = "_file_result"
VERIFY_OUT = "_verify_out"
"""What reaches the driver, as JSON: `{"file": result}` per file, or one kind's duplicate counts of a bucket."""
FILE_ROW = "file"
BUCKET_ROW = "bucket"
"""The key of the one row per hash bucket that `group_keys_stage` checked: `{"bucket": b, "keys": n, "pid": p}`."""
FILE_BUCKET = -1

_COLUMNS = {"rows": ["id"], "rejected": ["id", "row"], "scores": ["_row"], "rerank_rejects": ["row"],
            "ranked": ["query_id", "doc_id", "rank"], "rank_rejects": [], "file_reject": ["reason"]}
"""The columns each role of file is read for (the rest stay undecoded; data files add their float vectors, whose
norms `vector_schema` checks)."""


@dataclasses.dataclass(frozen=True)
class Named:
    """One file a commit names: its record, the commit (`owner`, its `item`), its `role` (one of `_COLUMNS`)
    and, for a file-reject marker, the reason it must carry. `i` orders results as the commits name files."""

    i: int
    ref: FileRef
    owner: str
    item: str | None
    role: str
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ref": self.ref.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Named:
        return cls(**{**data, "ref": FileRef.from_json(data["ref"])})


def _strings(column: pa.ChunkedArray) -> pa.Array:
    """The column's non-null values as strings."""
    return pc.cast(column.combine_chunks().drop_null(), pa.string())


def _row_keys(item: str, rows: pa.ChunkedArray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(item), _strings(rows), ":")


def _codes(column: pa.ChunkedArray) -> np.ndarray:
    return column.combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False)


def _rank_problems(table: pa.Table, n: Named, top_k: int | None) -> list[str]:
    """A rank file holds whole queries: ranks 1..n per query, n ≤ top_k, no (query_id, doc_id) pair twice."""
    problems = []
    t = table.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    q = _codes(t.column("query_id"))
    new = np.ones(len(q), dtype=bool)
    new[1:] = q[1:] != q[:-1]
    starts = np.flatnonzero(new)
    start_of_row = np.maximum.accumulate(np.where(new, np.arange(len(q)), 0))
    bad = t.column("rank").to_numpy(zero_copy_only=False) != np.arange(len(q)) - start_of_row + 1
    if top_k:
        lengths = np.diff(np.append(starts, len(q)))
        bad |= np.repeat(lengths > top_k, lengths)
    if bad.any():
        query = t.column("query_id")[int(np.flatnonzero(bad)[0])].as_py()
        problems.append(f"{n.ref.path}: ranks of query {query!r} are not 1..n (top_k={top_k})")
    p = table.sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
    qc, dc = _codes(p.column("query_id")), _codes(p.column("doc_id"))
    if ((qc[1:] == qc[:-1]) & (dc[1:] == dc[:-1])).any():
        problems.append(f"{n.ref.path}: a (query_id, doc_id) pair appears more than once")
    return problems


def _keys(table: pa.Table, n: Named) -> dict[str, pa.Array]:
    if n.role == "rows":
        return {"id": _strings(table.column("id"))}
    if n.role == "rejected":
        return {"id": _strings(table.column("id")), "row": _row_keys(n.item, table.column("row"))}
    if n.role in ("scores", "rerank_rejects"):
        return {"row": _row_keys(n.item, table.column("_row" if n.role == "scores" else "row"))}
    if n.role == "ranked":
        return {"query": pc.unique(_strings(table.column("query_id")))}
    return {}


def check_file(storage: Storage, n: Named, top_k: int | None,
               vectors: vector_schema.Expected | None = None) -> tuple[dict[str, Any], dict[str, pa.Array]]:
    """(result, row keys by kind) of one named file. The result (JSON-able): `i`, `rows` (read; None if the file
    is missing or unreadable), `problems`, `keys` (how many of each kind), `widths` (a data file's pooled-width
    vector columns, `vector_schema.file_problems`). `vectors`: the fingerprint's vector columns (embedding
    outputs), checked in every data file."""
    path, problems = n.ref.path, []
    result: dict[str, Any] = {"i": n.i, "rows": None, "problems": problems, "keys": {}, "widths": {}}
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        problems.append(f"{path} named by {n.owner} is missing")
        return result, {}
    if hashlib.sha256(data).hexdigest() != n.ref.sha256:
        problems.append(f"{path}: checksum differs from {n.owner}")
    try:
        parquet = parquet_bytes.parquet_file(data)
        expected = vectors if n.role == "rows" else None
        floats = vector_schema.columns_to_read(parquet.schema_arrow, expected)
        table = parquet.read(columns=_COLUMNS[n.role] + floats)
    except (pa.ArrowException, OSError, ValueError) as exc:
        problems.append(f"{path}: not a readable Parquet file with columns {_COLUMNS[n.role]} ({exc})")
        return result, {}
    result["rows"] = parquet.metadata.num_rows
    if result["rows"] != n.ref.rows:
        problems.append(f"{path}: {result['rows']} rows, {n.owner} says {n.ref.rows}")
    if n.role == "file_reject" and table.column("reason").to_pylist() != [n.reason]:
        problems.append(f"{n.owner}: its file-reject marker does not carry the reason {n.reason!r}")
    if n.role == "ranked":
        problems += _rank_problems(table, n, top_k)
    found, result["widths"] = vector_schema.file_problems(path, parquet.schema_arrow, table, expected)
    problems += found
    keys = _keys(table, n)
    result["keys"] = {kind: len(values) for kind, values in keys.items()}
    return result, keys


def count_keys(keys: collections.Counter) -> dict[str, dict[str, Any]]:
    """Duplicates among exact `(kind, key)` counts: per kind with any, how many keys repeat (`keys`), their
    occurrences beyond the first (`extra`) and the smallest of them (`example`)."""
    out: dict[str, dict[str, Any]] = {}
    for (kind, key), seen in keys.items():
        if seen > 1:
            d = out.setdefault(kind, {"keys": 0, "extra": 0, "example": key})
            d["keys"] += 1
            d["extra"] += seen - 1
            d["example"] = min(d["example"], key)
    return out


def duplicate_keys(parts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`count_keys`' answer from the per-bucket answers of `group_keys_stage` (`{"kind", "keys", "extra",
    "example"}` each): buckets hold disjoint keys, so counts add up."""
    out: dict[str, dict[str, Any]] = {}
    for p in parts:
        d = out.setdefault(p["kind"], {"keys": 0, "extra": 0, "example": p["example"]})
        d["keys"] += p["keys"]
        d["extra"] += p["extra"]
        d["example"] = min(d["example"], p["example"])
    return out


def describe_duplicates(kind: str, d: dict[str, Any]) -> str:
    if kind == "id":
        return f"{d['keys']} id(s) appear more than once (e.g. {d['example']!r})"
    if kind == "row":
        item, _, row = d["example"].rpartition(":")
        return f"{d['keys']} input row(s) appear more than once (e.g. row {row} of item {item})"
    return f"{d['keys']} query id(s) appear in more than one rank bucket (e.g. {d['example']!r})"


def key_hashes(keys: pa.Array) -> np.ndarray:
    """A 64-bit hash of each key, the same in every process (pandas' SipHash with its fixed key)."""
    from pandas.util import hash_array

    return hash_array(np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object)).view(np.int64)


_KEY_SCHEMA = pa.schema([(KEY_BUCKET, pa.int64()), (KEY_HASH, pa.int64()), (KEY_KIND, pa.string()),
                         (KEY, pa.string()), (FILE_RESULT, pa.string())])
_OUT_SCHEMA = pa.schema([(VERIFY_OUT, pa.string())])


@stage(needs=(VERIFY_FILE,), adds=tuple(_KEY_SCHEMA.names), drops=EVERY_COLUMN)
def check_file_stage(batch: pa.Table, storage: Storage, top_k: int | None, buckets: int,
                     vectors: vector_schema.Expected | None = None) -> pa.Table:
    """Ray Data stage: one named file in; one row with its result (bucket `FILE_BUCKET`) and one per row key
    (its hash, and the hash's bucket) out. The result also names the process that checked the file (`pid`):
    the evidence, in the report, that the files were checked in Ray's workers and not in the driver."""
    tables = []
    for text in batch.column(VERIFY_FILE).to_pylist():
        result, keys = check_file(storage, Named.from_json(json.loads(text)), top_k, vectors)
        result["pid"] = os.getpid()
        tables.append(pa.Table.from_pylist([{KEY_BUCKET: FILE_BUCKET, FILE_RESULT: json.dumps(result)}],
                                           schema=_KEY_SCHEMA))
        for kind, values in keys.items():
            hashes = key_hashes(values)
            tables.append(pa.table({KEY_BUCKET: pa.array(hashes.view(np.uint64) % np.uint64(buckets)).cast(pa.int64()),
                                    KEY_HASH: hashes, KEY_KIND: pa.array([kind] * len(values), pa.string()),
                                    KEY: values, FILE_RESULT: pa.nulls(len(values), pa.string())},
                                   schema=_KEY_SCHEMA))
    return pa.concat_tables(tables)


@stage(needs=tuple(_KEY_SCHEMA.names), adds=(VERIFY_OUT,), drops=EVERY_COLUMN)
def group_keys_stage(group: pa.Table) -> pa.Table:
    """Ray Data stage (map_groups by `KEY_BUCKET`): the file results pass on; a bucket of row keys becomes one
    row saying which bucket was checked (`BUCKET_ROW`: how many keys, in which process) and its duplicate counts,
    comparing exact keys only among rows whose hashes collide."""
    if group.num_rows and group.column(KEY_BUCKET)[0].as_py() == FILE_BUCKET:
        rows = [json.dumps({FILE_ROW: json.loads(r)}) for r in group.column(FILE_RESULT).to_pylist()]
        return pa.table({VERIFY_OUT: pa.array(rows, pa.string())})
    hashes = group.column(KEY_HASH).to_numpy()
    values, seen = np.unique(hashes, return_counts=True)
    colliding = group.filter(pa.array(np.isin(hashes, values[seen > 1])))
    exact = collections.Counter(zip(colliding.column(KEY_KIND).to_pylist(), colliding.column(KEY).to_pylist()))
    bucket = group.column(KEY_BUCKET)[0].as_py() if group.num_rows else None
    rows = [json.dumps({BUCKET_ROW: bucket, "keys": group.num_rows, "pid": os.getpid()})]
    rows += [json.dumps({"kind": kind, **d}) for kind, d in sorted(count_keys(exact).items())]
    return pa.Table.from_pylist([{VERIFY_OUT: r} for r in rows], schema=_OUT_SCHEMA)
