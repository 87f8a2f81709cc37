"""Planning: input shards → deterministic work items, the unit of commit and resume.

A work item is `(file, row_start, row_end)` with an id hashed from the file's
relative path (relative to the common prefix of every input's folder, so unique
across globs), version and the range, so the same input always plans the same
items. Parquet footers give row counts and let big files split at row-group
boundaries. A JSONL file larger than `input.jsonl_item_mb` is cut into ⌈size ÷ that⌉
equal byte ranges `[byte_start, byte_end)` (`jsonl_ranges`), planned from its size
alone (no scan); a range owns every line that *starts* inside it, so each line is
read by exactly one item (`pipelines.input.reading`). A smaller JSONL file is one
item, read whole, as is a compressed one (`.gz`, `.zst`, `.bz2`, … by name: a
compressed stream has no byte offsets to cut at; `pipelines.input.compressed`
refuses at planning what no codec reads). JSONL row counts are
learnt when read. Each item also pins its file as listed (size and version: S3 ETag,
local mtime), and readers fail the job naming the file if it is no longer that
version (`parquet_io.Pin`); ranged reads are checked the same way.

Footers are the one costly part of planning (two small GETs a Parquet file). A resume reuses the output's stored
plan (`PreviousPlan`, from `pipelines.output.plan_store`): a file listed with the same URL, path, size and
version as a stored item pinned, under the same planning settings (`planning_key`), takes its stored items
unread; only new or changed files have their footers read. A few are read on the driver's thread pool
(`FOOTER_THREADS`): each is I/O latency that threads overlap, with no Ray to start. More than
`FOOTERS_ON_CLUSTER` (a new corpus of thousands of files) are read by Ray tasks, `FOOTER_TASK_FILES` files each,
when the caller gives a way to run them (`on_cluster`; the job lifecycle does, starting or joining Ray then): a
footer is also CPU to parse (4,000 took ~19 s of one driver's CPU against the local test server), which a cluster
spreads over its nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import posixpath
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from common.errors import InputError
from pipelines.config import SourceConfig
from pipelines.input import compressed
from pipelines.input.parquet_io import CorruptFile, Pin, read_metadata
from pipelines.storage import InputFile, expand_inputs

BYTES_PER_TOKEN = 4.0
EXTENSIONS = {"parquet": ".parquet", "jsonl": ".jsonl*"}
"""What a folder given as an input lists: JSONL compressed or not (`pipelines.input.compressed`)."""
FOOTERS_ON_CLUSTER = 1_000
"""More Parquet footers than this to read, and planning reads them in Ray tasks (when `make_plan` is given
`on_cluster`)."""
FOOTER_TASK_FILES = 100
"""Files whose footers one planning task reads (on its own `FOOTER_TASK_THREADS` threads)."""
FOOTER_TASK_THREADS = 8

FOOTER_THREADS = 32
"""Parquet footers read at once while planning: each is ~2 small GETs, latency-bound against a remote store (against
the local test server on 2 cores it is CPU-bound: 4,000 footers in ~19 s, `benchmarks/control_plane.py`)."""


@dataclasses.dataclass(frozen=True)
class WorkItem:
    item_id: str
    url: str
    rel: str
    format: str
    row_start: int
    row_end: int | None
    row_groups: tuple[int, int] | None
    est_tokens: int
    bad_reason: str | None = None
    """Set when the whole file is rejected at planning (`on_bad_file: reject`); `bad_detail` says why."""
    bad_detail: str | None = None
    size: int | None = None
    """The file's size as planned; with `version`, its pinned identity (None in items recorded before pins)."""
    version: str | None = None
    """The file's version tag as planned (S3: ETag; local disk: mtime); readers check it (`parquet_io.Pin`)."""
    byte_start: int | None = None
    """A JSONL item cut from a larger file: its byte range `[byte_start, byte_end)`, owning every line that starts
    in it; its rows (`_row`) count that item's non-blank lines from 0. None: the whole file."""
    byte_end: int | None = None

    @property
    def byte_range(self) -> tuple[int, int] | None:
        """`(byte_start, byte_end)` of a JSONL item cut from a larger file; None for a whole file."""
        return None if self.byte_start is None or self.byte_end is None else (self.byte_start, self.byte_end)

    @property
    def pin(self) -> Pin | None:
        """What a reader must find the file to be; None for items recorded before pins (read unchecked)."""
        return Pin(self.size, self.version) if self.size is not None and self.version is not None else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["row_groups"] = list(self.row_groups) if self.row_groups else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkItem:
        d = dict(d)
        d["row_groups"] = tuple(d["row_groups"]) if d.get("row_groups") else None
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class PreviousPlan:
    """A stored plan `make_plan` may reuse: the `planning_key` of the settings that cut it and its items."""

    key: str
    items: Callable[[], Iterable[WorkItem]]


def planning_key(cfg: SourceConfig) -> str:
    """A hash of every setting that decides how a listed file is cut into items (format, `rows_per_item`, the cut
    of JSONL, columns checked, bad-file policy): equal keys and an equal file give equal items. `paths` and
    `storage_options` are left out: a reused item must match its file's URL, path, size and version anyway."""
    settings = cfg.model_dump(mode="json", exclude={"paths", "storage_options"})
    blob = json.dumps({"source": type(cfg).__name__, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclasses.dataclass(frozen=True)
class Plan:
    files: list[InputFile]
    items: list[WorkItem]
    footers_read: int = 0
    """Parquet files whose footer this plan read."""
    reused_files: int = 0
    """Parquet files whose items came from the stored plan unread (`PreviousPlan`)."""

    @property
    def known_rows(self) -> int:
        return sum(i.row_end - i.row_start for i in self.items if i.row_end is not None)

    @property
    def unknown_row_items(self) -> int:
        return sum(1 for i in self.items if i.row_end is None)

    @property
    def bad_items(self) -> list[WorkItem]:
        return [i for i in self.items if i.bad_reason]

    @property
    def est_tokens(self) -> int:
        return sum(i.est_tokens for i in self.items)

    def item_order(self) -> dict[str, int]:
        """Each item's position in file order (files sorted by URL, then row ranges): with a row index, what
        "first" means where a row's key appears twice (rerank keeps the first of duplicate pairs)."""
        return {item.item_id: n for n, item in enumerate(self.items)}

    def summary(self) -> dict[str, Any]:
        return {"dry_run": True, "files": len(self.files), "items": len(self.items), "rows": self.known_rows,
                "est_tokens": self.est_tokens}

    def estimate(self, tokens_per_gpu_s: float, usd_per_gpu_hour: float, gpus: int) -> tuple[dict[str, Any], str]:
        """GPU-hours, cost and wall time on `gpus` replicas for the estimated tokens: (figures, one line)."""
        gpu_hours = self.est_tokens / tokens_per_gpu_s / 3600
        figures = {"est_gpu_hours": round(gpu_hours, 3), "est_cost_usd": round(gpu_hours * usd_per_gpu_hour, 2),
                   "est_wall_hours": round(gpu_hours / max(gpus, 1), 3)}
        line = (f"estimate: ≈{gpu_hours:,.2f} GPU-hours at {tokens_per_gpu_s:,g} tokens/s per GPU "
                f"(compute.estimate_tokens_per_gpu_s) ≈ ${figures['est_cost_usd']:,.2f} at "
                f"${usd_per_gpu_hour:,.2f}/GPU-hour; ≈{figures['est_wall_hours']:,.2f} h wall on {max(gpus, 1)} "
                "replica(s) (compute.max_replicas)")
        return figures, line

    def describe(self) -> str:
        rows = f"{self.known_rows:,}"
        unknown = self.unknown_row_items - len(self.bad_items)
        if unknown:
            rows += f" (+ {unknown} JSONL item(s) counted when read)"
        lines = [
            f"plan: {len(self.files)} file(s), {len(self.items)} work item(s), {rows} rows, "
            f"≈{self.est_tokens:,} tokens (estimated at {BYTES_PER_TOKEN:g} bytes/token)"
            + (f"; {self.reused_files:,} unchanged file(s) planned as stored, {self.footers_read:,} footer(s) read"
               if self.reused_files else "")
        ]
        lines += [f"WARNING: rejecting {i.rel} whole ({i.bad_reason}): {i.bad_detail}" for i in self.bad_items]
        return "\n".join(lines)


def _item_id(f: InputFile, start: int | str, end: int | str | None) -> str:
    key = f"{f.rel}\x00{f.size}\x00{f.version}\x00{start}\x00{end}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _pin(f: InputFile) -> dict[str, Any]:
    """The WorkItem fields that pin `f` as listed: readers read that version or fail naming the file."""
    return {"size": f.size, "version": f.version}


def _check_parquet_schema(f: InputFile, schema: pa.Schema, cfg: SourceConfig) -> None:
    fields = cfg.fields()
    wanted = [fs.column for fs in fields if fs.column] + cfg.extra_columns
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        raise CorruptFile("schema_mismatch", f"{f.url}: column(s) {missing} not found (file has "
                          f"{schema.names}); check the config's *_column settings")
    for fs in fields:
        if fs.kind == "text" and fs.column:
            t = schema.field(fs.column).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
                raise CorruptFile("schema_mismatch",
                                  f"{f.url}: {fs.role} column {fs.column!r} has type {t}, expected string")


def _bad_file(f: InputFile, bad: CorruptFile, cfg: SourceConfig) -> list[WorkItem]:
    if cfg.on_bad_file == "fail":
        raise InputError(f"{bad.detail} [on_bad_file: fail; set input.on_bad_file: reject to record the file "
                         "in _rejects/ and go on]")
    return [WorkItem(_item_id(f, 0, None), f.url, f.rel, "parquet", 0, None, None, 0, bad.reason, bad.detail,
                     **_pin(f))]


def _plan_parquet(f: InputFile, cfg: SourceConfig) -> list[WorkItem]:
    try:
        meta = read_metadata(f.url, cfg.storage_options, Pin(f.size, f.version))
        schema = meta.schema.to_arrow_schema()
        _check_parquet_schema(f, schema, cfg)
    except CorruptFile as bad:
        return _bad_file(f, bad, cfg)
    text_cols = [fs.column for fs in cfg.fields() if fs.kind == "text" and fs.column]
    text_idx = [schema.get_field_index(c) for c in text_cols]

    items: list[WorkItem] = []
    g_start, row_start, rows, text_bytes = 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        rows += rg.num_rows
        text_bytes += sum(rg.column(i).total_uncompressed_size for i in text_idx if i < rg.num_columns)
        if rows >= cfg.rows_per_item or g == meta.num_row_groups - 1:
            end = row_start + rows
            items.append(
                WorkItem(_item_id(f, row_start, end), f.url, f.rel, "parquet", row_start, end,
                         (g_start, g + 1), int(text_bytes / BYTES_PER_TOKEN), **_pin(f))
            )
            g_start, row_start, rows, text_bytes = g + 1, end, 0, 0
    if not items:
        items.append(WorkItem(_item_id(f, 0, 0), f.url, f.rel, "parquet", 0, 0, (0, 0), 0, **_pin(f)))
    return items


def jsonl_ranges(size: int, item_bytes: int) -> list[tuple[int, int]]:
    """The byte ranges a JSONL file of `size` bytes is cut into: `ceil(size / item_bytes)` ranges of equal size
    (±1 byte), in file order; one range `(0, size)` when it is no larger than `item_bytes` (then read whole)."""
    n = max(1, -(-size // max(item_bytes, 1)))
    bounds = [k * size // n for k in range(n + 1)]
    return list(itertools.pairwise(bounds))


def _plan_jsonl(f: InputFile, cfg: SourceConfig) -> list[WorkItem]:
    ranges = jsonl_ranges(f.size, cfg.jsonl_item_bytes)
    if len(ranges) == 1 or compressed.codec_for(f.url) is not None:
        return [WorkItem(_item_id(f, 0, None), f.url, f.rel, "jsonl", 0, None, None, int(f.size / BYTES_PER_TOKEN),
                         **_pin(f))]
    # the ids of cut items hash their byte range, marked as bytes so that no row range can give the same key
    return [WorkItem(_item_id(f, f"bytes {start}", f"bytes {end}"), f.url, f.rel, "jsonl", 0, None, None,
                     int((end - start) / BYTES_PER_TOKEN), **_pin(f), byte_start=start, byte_end=end)
            for start, end in ranges]


def _without_protocol(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def _folder(f: InputFile) -> str:
    """The folder `f.rel` is relative to as listed (its glob's fixed prefix, or the directory given)."""
    path = _without_protocol(f.url)
    return path[: -len(f.rel) - 1] if path.endswith("/" + f.rel) else ""


def relative_to_common_prefix(files: list[InputFile]) -> list[InputFile]:
    """`files` with each `rel` relative to the common prefix of every glob's folder, not to its own glob's.

    `rel` is what generated ids (`<rel>:<row>`) and item ids are made of, so it must be unique across globs:
    `x/2025/*.parquet` and `x/2026/*.parquet` both list `part-0.parquet`, which become `2025/part-0.parquet` and
    `2026/part-0.parquet`. Inputs of one folder keep the paths relative to it, as before. Local and remote
    inputs mixed, or two buckets, have no common folder: their `rel` is the whole URL."""
    folders = sorted({_folder(f) for f in files})
    if len(folders) <= 1:
        return files
    try:
        common = posixpath.commonpath(folders)
    except ValueError:  # absolute (local) and bucket-relative (remote) paths mixed
        common = ""
    return [dataclasses.replace(f, rel=posixpath.relpath(_without_protocol(f.url), common) if common else f.url)
            for f in files]


def _stored_items(files: list[InputFile], cfg: SourceConfig,
                  previous: PreviousPlan | None) -> dict[str, list[WorkItem]]:
    """The stored items of each listed file that is exactly as the stored plan pinned it (URL, path, size,
    version), by URL; {} when there is no stored plan or other settings cut it."""
    if previous is None or previous.key != planning_key(cfg):
        return {}
    listed = {f.url: (f.rel, f.size, f.version) for f in files}
    found: dict[str, list[WorkItem]] = {}
    for item in previous.items():
        if item.size is not None and listed.get(item.url) == (item.rel, item.size, item.version):
            found.setdefault(item.url, []).append(item)
    return found


OnCluster = Callable[..., list[Any]]
"""`on_cluster(fn, args, **kwargs)`: `[fn(a, **kwargs) for a in args]`, each call a task on the cluster."""


def plan_parquet_files(files: list[InputFile], cfg: SourceConfig,
                       max_workers: int = FOOTER_TASK_THREADS) -> list[list[WorkItem]]:
    """Each file's work items, from its footer (`max_workers` read at once); one planning task's work."""
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(files)))) as pool:
        return list(pool.map(lambda f: _plan_parquet(f, cfg), files))


def _read_footers(files: list[InputFile], cfg: SourceConfig, max_workers: int,
                  on_cluster: OnCluster | None) -> dict[str, list[WorkItem]]:
    if on_cluster is None or len(files) <= FOOTERS_ON_CLUSTER:
        per_file = plan_parquet_files(files, cfg, max_workers) if files else []
    else:
        chunks = [files[a:a + FOOTER_TASK_FILES] for a in range(0, len(files), FOOTER_TASK_FILES)]
        per_file = [items for done in on_cluster(plan_parquet_files, chunks, cfg=cfg) for items in done]
    return dict(zip((f.url for f in files), per_file))


def make_plan(cfg: SourceConfig, max_workers: int = FOOTER_THREADS, previous: PreviousPlan | None = None,
              on_cluster: OnCluster | None = None) -> Plan:
    """List, sort and split the input into work items; reads only listings and Parquet footers (a JSONL file is
    cut by its listed size), and no footer of a file `previous` (the output's stored plan) planned as listed;
    more than `FOOTERS_ON_CLUSTER` footers in tasks run by `on_cluster`, if given."""
    files = relative_to_common_prefix(expand_inputs(cfg.paths, EXTENSIONS[cfg.format], cfg.storage_options))
    footers, reused = 0, 0
    if cfg.format == "parquet":
        stored = _stored_items(files, cfg, previous)
        unread = [f for f in files if f.url not in stored]
        read = _read_footers(unread, cfg, max_workers, on_cluster)
        per_file = [stored.get(f.url) or read[f.url] for f in files]
        footers, reused = len(unread), len(files) - len(unread)
    else:
        per_file = [_plan_jsonl(f, cfg) for f in files]
        compressed.check_planned([f.url for f in files], cfg.storage_options)
    items = [item for items in per_file for item in items]
    if items and all(i.bad_reason for i in items):
        raise InputError(f"every input file is unusable, which points at the config rather than the data; "
                         f"the first: {items[0].bad_detail}")
    return Plan(files=files, items=items, footers_read=footers, reused_files=reused)
