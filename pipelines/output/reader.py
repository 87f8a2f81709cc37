"""The public reader: committed rows of an output, read through its commit records (never a glob of `data/`).

The committed rows are exactly the files the commits name (item commits for embeddings, rank commits for
reranking). An index root (`embedrank reindex`) is read through its pointer, so readers never see a version
that is still being built.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import OutputError
from pipelines.output.records import ItemCommit
from pipelines.output.root import JOB_FILE, OutputRoot
from pipelines.storage import Storage


def current_version_url(output: str, storage_options: dict[str, Any] | None = None) -> str:
    """For an index root, the URL of its current version; any other output, itself."""
    from pipelines.reindex.index import IndexRoot

    index = IndexRoot(Storage(output, storage_options))
    pointer = None if index.storage.exists(JOB_FILE) else index.current()
    return index.version_url(pointer["version"]) if pointer else output


def open_committed(output: str, storage_options: dict[str, Any] | None) -> tuple[OutputRoot, dict[str, Any],
                                                                                 dict[str, ItemCommit]]:
    """(root, `_job.json`, the planned items' commits in plan order) of an output or an index's current version."""
    root = OutputRoot(Storage(current_version_url(output, storage_options), storage_options))
    job = root.read_job()
    if job is None:
        raise OutputError(f"{output}: no _job.json; not an embedrank output (or nothing was run yet)")
    return root, job, root.read_commits([i["item_id"] for i in job["items"]])


def is_rerank(job: dict[str, Any]) -> bool:
    return job["fingerprint"].get("task") == "rerank"


def _read(root: OutputRoot, paths: list[str]) -> pa.Table:
    tables = [pq.read_table(io.BytesIO(root.storage.read_bytes(p))) for p in paths]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default").replace_schema_metadata(tables[0].schema.metadata)


def read_committed(output: str, storage_options: dict[str, Any] | None = None, *,
                   rejects: bool = False) -> pa.Table:
    """All committed rows (or rejects) of an output, or of an index root's current version, as one Table.

    Embedding outputs: id, embedding, n_tokens, truncated, pass-through columns.
    Rerank outputs: query_id, doc_id, score, rank. Rejects: id column(s), row, reason, item.
    """
    root, job, commits = open_committed(output, storage_options)
    ordered = list(commits.values())
    if not is_rerank(job):
        return _read(root, [f.path for c in ordered for f in (c.rejects if rejects else c.files)])
    ranks = list(root.read_rank_commits().values())
    if rejects:
        return _read(root, [f.path for c in [*ordered, *ranks] for f in c.rejects])
    return _read(root, [f.path for c in ranks for f in c.files])
