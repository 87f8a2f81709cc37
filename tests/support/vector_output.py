"""A committed embedding output with several vector columns, built without Ray: the real commit protocol
(`support.late_writer`'s items and records, `OutputRoot`, `put_piece`) on rows whose columns
`actors.quantize.vector_columns` cuts from seeded random unit vectors, as a replica does. The fingerprint is an
embedding job's (`task: embed`, `vectors`), so `embedrank verify` checks the columns against it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from actors.quantize import VectorSpec, calibration_ranges, vector_columns
from pipelines.output.lock import OutputLock, held_epoch
from pipelines.output.pieces import put_piece
from pipelines.output.records import Piece, Totals
from pipelines.output.root import OutputRoot
from pipelines.storage import Storage
from support.late_writer import FP_ID, commit_of, item

POOLED = 16
ROWS = 3
"""Rows per item (`support.late_writer.item`)."""
VECTORS = [{"column": "f32", "dimensions": None, "dtype": "float32"},
           {"column": "i8", "dimensions": 8, "dtype": "int8"},
           {"column": "bits", "dimensions": None, "dtype": "ubinary"}]
HALF = {"column": "h", "dimensions": None, "dtype": "float16"}


def pooled(n: int) -> np.ndarray:
    """Item `n`'s rows of unit vectors, POOLED wide."""
    v = np.random.default_rng(n).standard_normal((ROWS, POOLED)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fingerprint(vectors: list[dict]) -> dict:
    return {"task": "embed", "model": "vector-output-test", "vector_dtype": "float32", "dimensions": None,
            "vectors": vectors}


def specs(vectors: list[dict]) -> list[VectorSpec]:
    ranges = calibration_ranges(np.vstack([pooled(n) for n in range(1, 4)]), 8)
    return [VectorSpec(v["column"], v["dimensions"] or POOLED, v["dtype"],
                       (tuple(ranges[0]), tuple(ranges[1])) if v["dtype"] == "int8" else None) for v in vectors]


def rows_of(n: int, vectors: list[dict]) -> pa.Table:
    columns = vector_columns(pooled(n), specs(vectors))
    return pa.table({"id": [f"d{n}-{i}" for i in range(ROWS)], **columns,
                     "n_tokens": pa.array([5] * ROWS, pa.int32()), "truncated": [False] * ROWS})


def build_vector_output(store: Storage, vectors: list[dict] = VECTORS, items=(1, 2, 3),
                        recorded: dict | None = None) -> dict:
    """Commit items `items` (3 rows each) to `store` under its lock; returns the commit records by item."""
    fp = fingerprint(vectors)
    with OutputLock(store, 30):
        root = OutputRoot(store)
        planned = [item(n) for n in items]
        commits = root.prepare(fp, FP_ID, planned, recorded or {"test": True}, None)
        for it in planned:
            n = int(it.item_id, 16)
            ref = put_piece(store, "data", f"{it.item_id}-0-2", rows_of(n, vectors), json.dumps(fp, sort_keys=True),
                            held_epoch(store))
            piece = Piece(item=it.item_id, start=0, end=ROWS, item_rows=ROWS, data_files=(ref,))
            commits[it.item_id] = root.write_commit(commit_of(it, [piece]))
        root.remove_orphans(commits, planned=commits.keys())
        root.write_commit_snapshot(commits)
        root.write_success(Totals.of(commits.values()))
    return commits
