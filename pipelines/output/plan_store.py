"""The stored plan of an output: a small header in `_job.json` and the work items in content-addressed shards.

`_job.json` used to hold every work item inline and was rewritten whole on every run and read whole by every
reader; at 20,000 items that is megabytes of JSON parsed for a status line. Now its `plan` key is a header
(item count, known rows, digest, shard names, the planning settings' key) and the items live in
`_plan/<digest>/items-NNNNN-e<epoch>.parquet`, `SHARD_ITEMS` items a shard, one row per item. The digest hashes
every item, so a shard's folder fixes its contents; the writer's lease epoch in the name means no two lock
holders write one path, and nothing ever deletes a shard. A shard is written only when absent, and a resume with the same plan
writes nothing but the header. Readers go shard by shard (`iter_shards`), so a reader that wants ids or counts
never holds every item; outputs written before shards (items inline under `items`) still read.

Shards of a superseded plan (a resume that planned other items, e.g. new input files) are left in place: a
`status` or `verify` that read the previous header may still be reading them, they are control files (never
pieces, so orphan removal leaves them alone), and they weigh ~100 bytes an item.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.input.plan import PreviousPlan, WorkItem
from pipelines.output.control import epoch_tag
from pipelines.output.lock import fence
from pipelines.storage import Storage
from pipelines import parquet_bytes

PLAN_DIR = "_plan"
SHARD_ITEMS = 4096
"""Items per shard: a shard of 4,096 items is ~0.2 MiB of Parquet, read in one GET."""

PLAN_FORMAT = 1

SCHEMA = pa.schema([
    ("item_id", pa.string()), ("url", pa.string()), ("rel", pa.string()), ("format", pa.string()),
    ("row_start", pa.int64()), ("row_end", pa.int64()), ("rg_start", pa.int64()), ("rg_end", pa.int64()),
    ("est_tokens", pa.int64()), ("bad_reason", pa.string()), ("bad_detail", pa.string()), ("size", pa.int64()),
    ("version", pa.string()), ("byte_start", pa.int64()), ("byte_end", pa.int64()),
])


def _row(item: WorkItem) -> dict[str, Any]:
    d = dataclasses.asdict(item)
    groups = d.pop("row_groups")
    d["rg_start"], d["rg_end"] = (groups[0], groups[1]) if groups else (None, None)
    return d


def _item(row: dict[str, Any]) -> WorkItem:
    start, end = row.pop("rg_start"), row.pop("rg_end")
    return WorkItem(**row, row_groups=(start, end) if start is not None else None)


def plan_digest(items: list[WorkItem]) -> str:
    """A hash of every field of every item, in plan order: the plan's content address."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item.to_dict(), sort_keys=True).encode() + b"\n")
    return h.hexdigest()[:24]


def _shard_bytes(items: list[WorkItem]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([_row(i) for i in items], schema=SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def _shard_number(name: str) -> int | None:
    """k of `items-k.parquet` (written before epochs) or `items-k-e<epoch>.parquet`."""
    found = re.fullmatch(r"items-(\d{5})(?:-e\d+)?\.parquet", name)
    return int(found.group(1)) if found else None


def write_plan(storage: Storage, items: list[WorkItem], planned_with: str | None, epoch: int = 0) -> dict[str, Any]:
    """Store `items` as shards (those not there yet under any lease's name, fenced by the lock; new ones carry this
    writer's lease `epoch`) and return the header that names them.

    `planned_with` is `plan.planning_key` of the settings that cut the items (None: unknown; never reused)."""
    digest = plan_digest(items)
    folder = f"{PLAN_DIR}/{digest}"
    present: dict[int, str] = {}
    for path in storage.list_files(folder):
        name = path.rsplit("/", 1)[-1]
        if _shard_number(name) is not None:
            present.setdefault(_shard_number(name), name)
    names = []
    for k in range(-(-len(items) // SHARD_ITEMS)):
        name = present.get(k) or f"items-{k:05d}-{epoch_tag(epoch)}.parquet"
        if k not in present:
            data = _shard_bytes(items[k * SHARD_ITEMS:(k + 1) * SHARD_ITEMS])
            fence(storage)
            storage.write_bytes(f"{folder}/{name}", data)
        names.append(name)
    return {"format": PLAN_FORMAT, "digest": digest, "items": len(items), "shards": names,
            "known_rows": sum(i.row_end - i.row_start for i in items if i.row_end is not None),
            "planned_with": planned_with}


def header(job: dict[str, Any]) -> dict[str, Any]:
    """`job`'s plan header; for an output written before shards, one computed from its inline items."""
    if "plan" in job:
        return job["plan"]
    items = job.get("items", [])
    return {"format": 0, "items": len(items), "shards": [], "planned_with": None,
            "known_rows": sum(i["row_end"] - i["row_start"] for i in items if i.get("row_end") is not None)}


def iter_shards(storage: Storage, job: dict[str, Any], columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The planned items as Arrow tables, one a shard, in plan order (`columns`: only those)."""
    if "plan" not in job:  # inline items (written before shards)
        items = job.get("items", [])
        for start in range(0, len(items), SHARD_ITEMS):
            table = pa.Table.from_pylist([_row(WorkItem.from_dict(d)) for d in items[start:start + SHARD_ITEMS]],
                                         schema=SCHEMA)
            yield table.select(columns) if columns else table
        return
    plan = job["plan"]
    for name in plan["shards"]:
        data = storage.read_bytes(f"{PLAN_DIR}/{plan['digest']}/{name}")
        yield parquet_bytes.read_table(data, columns=columns)


def iter_items(storage: Storage, job: dict[str, Any]) -> Iterator[list[WorkItem]]:
    """The planned work items, a shard at a time, in plan order."""
    for table in iter_shards(storage, job):
        yield [_item(row) for row in table.to_pylist()]


def iter_item_ids(storage: Storage, job: dict[str, Any]) -> Iterator[list[str]]:
    """The planned item ids, a shard at a time (only the id column is decoded)."""
    for table in iter_shards(storage, job, ["item_id"]):
        yield table.column("item_id").to_pylist()


def previous_plan(storage: Storage, job: dict[str, Any] | None) -> PreviousPlan | None:
    """What `make_plan` may reuse from `job`'s stored plan: its items and the key of the settings that cut them;
    None when there is no stored plan or it does not record that key."""
    if job is None or "plan" not in job or not job["plan"].get("planned_with"):
        return None

    def items() -> Iterator[WorkItem]:
        try:
            for shard in iter_items(storage, job):
                yield from shard
        except Exception:  # noqa: BLE001 - a shard gone or unreadable: its files' footers are read instead
            return

    return PreviousPlan(key=job["plan"]["planned_with"], items=items)
