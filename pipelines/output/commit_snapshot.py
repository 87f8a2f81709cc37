"""A snapshot of an output's commit records, so that a resume or `status` need not GET every record.

`_commits/<item>.json` stays the truth: a record is created once, as the item's commit point. Reading 20,000 of
them one GET each is what made a resume slow (about two minutes on this project's 2-core machine), so the lock
holder also keeps `_commits_snapshot.parquet`: one row per record it has read or written, with the record's JSON
and its version as `_commits/` lists it (S3: size and ETag, the content's MD5; local disk: size and mtime). A
reader lists `_commits/` (one LIST per 1,000 records), takes from the snapshot each record whose listed version
is the one the snapshot holds, and GETs the others (records written since, or deleted and made again). A
snapshot that is stale, partial or unreadable therefore costs GETs, never a wrong record; it is written only
under the lock (`OutputRoot.prepare` when it had to GET records, `close_output` at the end of a run).
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from common.object_version import object_version
from pipelines.output.lock import fence
from pipelines.output.records import ItemCommit
from pipelines.storage import Storage
from pipelines import parquet_bytes

SNAPSHOT_FILE = "_commits_snapshot.parquet"
SCHEMA = pa.schema([("item", pa.string()), ("version", pa.string()), ("record", pa.string())])


def listed_versions(storage: Storage, folder: str) -> dict[str, str]:
    """Item id → listed version (`size:tag`) of every `<item>.json` under `folder`, from one recursive listing."""
    base = storage.path(folder)
    storage.fs.invalidate_cache(base)
    try:
        found = storage.fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    finally:
        storage.fs.invalidate_cache(base)  # s3fs would keep every entry's details cached for the process's life
    out = {}
    for path, info in found.items():
        name = posixpath.basename(path)
        if name.endswith(".json") and info.get("type", "file") == "file":
            out[name[: -len(".json")]] = f"{info.get('size')}:{object_version(info)}"
    return out


def read_snapshot(storage: Storage) -> dict[str, tuple[str, str]]:
    """Item id → (version, record JSON) as the snapshot holds them ({} when there is none or it is unreadable)."""
    try:
        table = parquet_bytes.read_table(storage.read_bytes(SNAPSHOT_FILE))
    except (FileNotFoundError, pa.ArrowException):
        return {}
    if table.schema.names != SCHEMA.names:
        return {}
    items, versions, records = (table.column(n).to_pylist() for n in SCHEMA.names)
    return {i: (v, r) for i, v, r in zip(items, versions, records)}


def from_snapshot(snapshot: dict[str, tuple[str, str]], listed: dict[str, str],
                  ids: Iterable[str]) -> dict[str, ItemCommit]:
    """The records of `ids` the snapshot holds at the version `_commits/` lists now."""
    out = {}
    for item in ids:
        held = snapshot.get(item)
        if held is not None and item in listed and held[0] == listed[item]:
            out[item] = ItemCommit.from_json(json.loads(held[1]))
    return out


def write_snapshot(storage: Storage, folder: str, commits: dict[str, ItemCommit],
                   listed: dict[str, str] | None = None) -> int:
    """Store the snapshot of `commits` (records as the store holds them) at the versions `folder` lists
    (`listed`, the caller's listing taken before it read the records; by default one taken now); a record not
    listed is left out (a later reader GETs it). Lock holder only. Returns the rows written."""
    listed = listed_versions(storage, folder) if listed is None else listed
    rows = [(item, listed[item], json.dumps(c.to_json(), sort_keys=True))
            for item, c in commits.items() if item in listed]
    table = pa.table([pa.array(col, pa.string()) for col in zip(*rows)] if rows else
                     [pa.array([], pa.string())] * 3, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    fence(storage)
    storage.write_bytes(SNAPSHOT_FILE, buf.getvalue())
    return len(rows)
