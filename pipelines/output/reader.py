"""The public reader: committed rows of an output, read through its commit records (never a glob of `data/`).

The committed rows are exactly the files the commits name (item commits for embeddings, rank commits for
reranking). An index root (`embedrank reindex`) is read through its pointer, so readers never see a version
that is still being built.

Four forms: `committed_files` (the files' full URLs, for any other reader), `open_dataset` (a pyarrow dataset
over exactly them: streamed, filtered, handed to DuckDB, Polars, LanceDB), `read_dataset` (a Ray Dataset over
them, at cluster scale) and `read_committed` (one in-memory Table, for small outputs).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from common.errors import OutputError
from pipelines.output.records import FileRef, ItemCommit
from pipelines.output.index_pointer import current_version, version_storage
from pipelines.output.root import JOB_FILE, OutputRoot
from pipelines.storage import Storage
from pipelines import parquet_bytes


def current_version_url(output: str, storage_options: dict[str, Any] | None = None) -> str:
    """For an index root, the URL of its current version; any other output, itself."""
    storage = Storage(output, storage_options)
    version = None if storage.exists(JOB_FILE) else current_version(storage)
    return version_storage(storage, version).url if version else output


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


def committed_refs(root: OutputRoot, job: dict[str, Any], commits: dict[str, ItemCommit],
                   rejects: bool) -> list[FileRef]:
    """The files (paths relative to the root, rows, checksums) that hold the committed rows (or rejects), in commit
    order: item commits' files for embeddings, the rank commits' (ranked from exactly these scores) for a rerank."""
    ordered = list(commits.values())
    if not is_rerank(job):
        return [f for c in ordered for f in (c.rejects if rejects else c.files)]
    ranks = list(root.ranks_of(commits).values())
    if rejects:
        return [f for c in [*ordered, *ranks] for f in c.rejects]
    return [f for c in ranks for f in c.files]


def _committed_paths(root: OutputRoot, job: dict[str, Any], commits: dict[str, ItemCommit],
                     rejects: bool) -> list[str]:
    """The files (relative to the root) that hold the committed rows (or rejects), in commit order."""
    return [f.path for f in committed_refs(root, job, commits, rejects)]


def _read(root: OutputRoot, paths: list[str]) -> pa.Table:
    tables = [parquet_bytes.read_table(root.storage.read_bytes(p)) for p in paths]
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
    return _read(root, _committed_paths(root, job, commits, rejects))


def _located(output: str, storage_options: dict[str, Any] | None, rejects: bool) -> tuple[Storage, list[str]]:
    """The storage of the output (an index root: its current version) and the full paths on it of its
    committed files (or rejects), in commit order."""
    root, job, commits = open_committed(output, storage_options)
    return root.storage, [root.storage.path(p) for p in _committed_paths(root, job, commits, rejects)]


def committed_files(output: str, storage_options: dict[str, Any] | None = None, *,
                    rejects: bool = False) -> list[str]:
    """The full URLs of the files that hold an output's committed rows (or rejects), in commit order: what any
    reader (DuckDB, Polars, pandas, LanceDB, Spark) should be given instead of a glob of `data/`."""
    storage, paths = _located(output, storage_options, rejects)
    return paths if storage.is_local else [storage.fs.unstrip_protocol(p) for p in paths]


def committed_listing(output: str, storage_options: dict[str, Any] | None = None, *,
                      rejects: bool = False) -> list[dict[str, Any]]:
    """`embedrank files --json`: one row per committed file (or reject file): its URL, rows, bytes and SHA-256."""
    root, job, commits = open_committed(output, storage_options)
    storage = root.storage
    out = []
    for ref in committed_refs(root, job, commits, rejects):
        path = storage.path(ref.path)
        out.append({"url": path if storage.is_local else storage.fs.unstrip_protocol(path), "rows": ref.rows,
                    "bytes": ref.bytes, "sha256": ref.sha256})
    return out


def arrow_filesystem(storage: Storage):
    """The `pyarrow.fs.FileSystem` of a storage: pyarrow's own for local disk, its fsspec filesystem (S3 and
    any other, with the storage options) wrapped for pyarrow elsewhere."""
    import pyarrow.fs

    if storage.is_local:
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs))


def open_dataset(output: str, storage_options: dict[str, Any] | None = None, *, rejects: bool = False):
    """A `pyarrow.dataset.Dataset` over exactly the committed files (or rejects) of an output: streamed and
    filtered by pyarrow (`to_batches`, `scanner(columns=..., filter=...)`), never loaded whole.

    Its schema is the first file's (every data file of an output has the same columns)."""
    import pyarrow.dataset as ds

    storage, paths = _located(output, storage_options, rejects)
    if not paths:
        return ds.dataset(pa.table({}))
    return ds.dataset(paths, format="parquet", filesystem=arrow_filesystem(storage))


def read_dataset(output: str, storage_options: dict[str, Any] | None = None, *, rejects: bool = False):
    """A Ray Dataset over exactly the committed files (or rejects) of an output, for work at cluster scale
    (`map_batches`, `write_*`). It runs on the Ray this process is connected to (Ray Data starts a local one
    if none is)."""
    from pipelines import graph

    storage, paths = _located(output, storage_options, rejects)
    return graph.read_parquet_files(paths, arrow_filesystem(storage))
