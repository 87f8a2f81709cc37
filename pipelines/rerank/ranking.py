"""Ranking scored pairs per query, after every score is committed.

A query's candidates may sit in many work items and shards, so ranks cannot be
given while scoring. Once all items are committed, scores are hashed by
`query_id` into buckets (Ray Data groupby, on the cluster); one bucket holds
every candidate of its queries, is ranked whole and committed whole.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common import failpoints
from common.columns import BUCKET, DOC_ID, ITEM, PATH, QUERY_ID, ROW, SCORE
from pipelines.output.pieces import DATA_DIR, REJECTS_DIR, put_piece, reject_table
from pipelines.output.records import RankCommit
from pipelines.stages import EVERY_COLUMN, stage
from pipelines.storage import Storage
from pipelines import parquet_bytes

MAX_PAIRS_PER_BUCKET = 2_000_000
"""Scored pairs a rank bucket holds, on average, with `output.rank_buckets: auto`. One rank task holds its whole
bucket in memory: measured ≈330-370 bytes a pair at peak with ids of 10-14 characters, 76 of them the bucket's own
Arrow table (`python -m benchmarks.rank_memory`, benchmarks/results/rank-memory-2026-11-30.txt), so ≈0.7 GiB a task
at this size, which any worker fits beside the ~0.3 GB it starts with, while a billion pairs still make 500 buckets
to spread over a cluster. Buckets are hashed by query, so the largest holds a few percent more than the mean."""

SCORE_COLUMNS = [QUERY_ID, DOC_ID, SCORE, ITEM, ROW]
FILE_ORDER = "_file_order"
"""A score row's work item's position in the plan (`Plan.item_order`), inside `rank_table` only."""


def rank_bucket_count(setting: int | str, scored_pairs: int, recorded: int | None = None) -> tuple[int, str]:
    """How many buckets the rank phase hashes queries into, and why (printed at its start).

    An integer `output.rank_buckets` is used as is. `auto`: the count that rank commits already made (`recorded`)
    keep, if any, so that a resumed rank phase hashes as its first run did; else ⌈scored pairs ÷
    `MAX_PAIRS_PER_BUCKET`⌉, at least 1. The committed pair count cannot change between a rank phase's runs (new
    scores drop every rank commit first), so the recorded count only matters if `MAX_PAIRS_PER_BUCKET` does."""
    if setting != "auto":
        return int(setting), f"output.rank_buckets: {setting}"
    wanted = max(1, -(-scored_pairs // MAX_PAIRS_PER_BUCKET))
    if recorded is not None:
        return recorded, (f"output.rank_buckets: auto, as the {recorded} of the rank commits already made"
                          + (f" (now {wanted})" if recorded != wanted else ""))
    return wanted, f"output.rank_buckets: auto, ≤ {MAX_PAIRS_PER_BUCKET:,} pairs a bucket"


def bucket_of(query_ids: list[str], buckets: int) -> np.ndarray:
    """Stable across processes and runs (unlike Python's salted hash)."""
    return np.fromiter((zlib.crc32(q.encode()) % buckets for q in query_ids), dtype=np.int64,
                       count=len(query_ids))


@stage(needs=(PATH,), adds=(*SCORE_COLUMNS, BUCKET), drops=EVERY_COLUMN)
def read_score_files(batch: pa.Table, storage: Storage, buckets: int, skip_buckets: list[int]) -> pa.Table:
    """Ray Data stage: committed score files in, their rows out with `_bucket` (committed buckets dropped)."""
    tables = [parquet_bytes.read_table(storage.read_bytes(p), columns=SCORE_COLUMNS)
              for p in batch.column(PATH).to_pylist()]
    table = pa.concat_tables(tables).replace_schema_metadata(None)
    table = table.append_column(BUCKET, pa.array(bucket_of(table.column(QUERY_ID).to_pylist(), buckets)))
    if skip_buckets:
        table = table.filter(pc.invert(pc.is_in(table.column(BUCKET), pa.array(skip_buckets, pa.int64()))))
    return table


def _group_starts(codes: np.ndarray) -> np.ndarray:
    """For each row of a table sorted by a key, the index where its key's run starts."""
    new_run = np.ones(len(codes), dtype=bool)
    new_run[1:] = codes[1:] != codes[:-1]
    return np.maximum.accumulate(np.where(new_run, np.arange(len(codes)), 0))


def _codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.dictionary_encode().indices.to_numpy(zero_copy_only=False)


def _file_order(items: pa.ChunkedArray | pa.Array, item_order: Mapping[str, int]) -> pa.Array:
    """Each row's position of its item in file order, looked up once per distinct item."""
    arr = items.combine_chunks() if isinstance(items, pa.ChunkedArray) else items
    encoded = arr.dictionary_encode()
    positions = pa.array([item_order[i] for i in encoded.dictionary.to_pylist()], pa.int64())
    return positions.take(encoded.indices)


def rank_table(table: pa.Table, top_k: int | None, item_order: Mapping[str, int]) -> tuple[pa.Table, pa.Table]:
    """(ranked rows, duplicate rows): one row per (query_id, doc_id), rank 1 = best score within the query.

    Duplicates keep their first occurrence by file order: the item's position in the plan (`item_order`, item
    id → position), then the row in its file; item ids are hashes, so their order says nothing. Ties in score
    rank by doc_id.
    """
    table = table.append_column(FILE_ORDER, _file_order(table.column(ITEM), item_order))
    table = table.sort_by([(QUERY_ID, "ascending"), (DOC_ID, "ascending"), (FILE_ORDER, "ascending"),
                           (ROW, "ascending")]).drop_columns([FILE_ORDER])
    q, d = _codes(table.column("query_id")), _codes(table.column("doc_id"))
    dup = np.zeros(table.num_rows, dtype=bool)
    dup[1:] = (q[1:] == q[:-1]) & (d[1:] == d[:-1])
    duplicates = table.filter(pa.array(dup))
    unique = table.filter(pa.array(~dup)).sort_by([("query_id", "ascending"), ("score", "descending"),
                                                    ("doc_id", "ascending")])
    codes = _codes(unique.column("query_id"))
    rank = np.arange(unique.num_rows) - _group_starts(codes) + 1
    ranked = pa.table({"query_id": unique.column("query_id"), "doc_id": unique.column("doc_id"),
                       "score": pc.cast(unique.column("score"), pa.float32()),
                       "rank": pa.array(rank.astype(np.int32))})
    if top_k is not None:
        ranked = ranked.filter(pc.less_equal(ranked.column("rank"), top_k))
    return ranked, duplicates


@stage(needs=(*SCORE_COLUMNS, BUCKET), adds=RankCommit.ARROW_SCHEMA.names, drops=EVERY_COLUMN)
def rank_bucket(group: pa.Table, storage: Storage, fingerprint: dict, top_k: int | None,
                item_order: Mapping[str, int], epoch: int = 0) -> pa.Table:
    """Ray Data stage (map_groups): one bucket's scores in; its ranked file written; one record out."""
    failpoints.hit("rank_bucket")
    bucket = int(group.column("_bucket")[0].as_py())
    ranked, duplicates = rank_table(group, top_k, item_order)
    fp = json.dumps(fingerprint, sort_keys=True)
    stem = f"rank-{bucket:05d}"
    data = put_piece(storage, DATA_DIR, stem, ranked, fp, epoch) if ranked.num_rows else None
    rejects = None
    if duplicates.num_rows:
        rej = reject_table(duplicates, ["query_id", "doc_id"],
                           pa.array(["duplicate_pair"] * duplicates.num_rows, pa.string()))
        rejects = put_piece(storage, REJECTS_DIR, stem, rej, fp, epoch)
    row = RankCommit.row(bucket, data, rejects, queries=len(pc.unique(group.column("query_id"))),
                         scored=group.num_rows)
    return pa.Table.from_pylist([row], schema=RankCommit.ARROW_SCHEMA)
