"""`embedrank reindex`: the next version of an index from a new snapshot, computing only what changed.

1. Plan the snapshot; read the current version (the pointer), its commits and its items' content digests.
2. Items whose input bytes and job fingerprint are unchanged are kept by reference: their commit records are
   copied with paths rebased to the old files (no read, no compute, no copy of vectors).
3. Digest, on the cluster (one task per item, reading ids, texts and pass-through values): each other item's
   content digest. An item whose digest equals a committed item's of the current version (whatever its file's
   name or bytes: a re-export, a renamed shard) is kept by reference too, under its new item id.
4. Diff, on the cluster, one task per input file: its remaining items' rows ⟗ the current version's rows of
   the same file on id, inside the task (no shuffle); the documents no local join matched (new, deleted, moved
   between files) come to the driver, which pairs them (`pipelines.reindex.match`). Out: exact counts of new,
   changed, unchanged, deleted and rejected documents. Nothing new, changed or deleted: nothing is published.
   With a changed fingerprint there is no diff: every vector changes (a full re-embed).
5. Build, on the cluster, one task per remaining item: its rows; unchanged documents carry their vector from
   the base files of the same input file (and those its moved documents came from), read in the same task;
   new and changed ones are embedded; each item commits exactly as in `embedrank embed` (so a rerun after a
   crash resumes the same unpublished version, with the decisions of steps 3-4 read back from `_reindex.json`).
6. Publish (the step after close): `_SUCCESS` in the version, then the pointer, written last and atomically.

The summary says where the time went (`phases`: plan, base, digest, diff, build, close, publish).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from common.columns import CONTENT_DIGEST, DIFF_JSON, ITEM
from common.errors import OutputError
from pipelines.embed.job import embed_fingerprint
from pipelines.fingerprint import describe_difference, fingerprint_id
from pipelines.input.plan import Plan, WorkItem
from pipelines.embed.calibration import calibrated
from pipelines.lifecycle import ItemsOutcome, JobSpec, Work, recorded_config
from pipelines.output.records import ItemCommit, Totals
from pipelines.preflight import preflight_model
from pipelines.progress import format_duration
from pipelines.ray_runtime import stream_rows
from pipelines.reindex.config import ReindexJobConfig
from pipelines.reindex.index import CURRENT_FILE, IndexRoot, rebase
from pipelines.reindex.match import (
    base_files_by_source,
    diff_tasks,
    keep_by_digest,
    kept_commit,
    resolve,
)
from pipelines.reindex.stages import CHANGE_KINDS
from pipelines.storage import Storage

PHASES = ("plan", "base", "digest", "diff", "build", "close", "publish")


def _plan_digest(plan: Plan) -> str:
    return hashlib.sha256("\n".join(i.item_id for i in plan.items).encode()).hexdigest()[:24]


class _Base:
    """The current version as this run sees it: its fingerprint, commit records and items' content digests."""

    def __init__(self, index: IndexRoot):
        pointer = index.current()
        self.name: str | None = pointer["version"] if pointer else None
        self.fingerprint_id: str | None = None
        self.fingerprint: dict[str, Any] = {}
        self.commits: dict[str, ItemCommit] = {}
        self.digests: dict[str, str] = {}
        self.job: dict[str, Any] | None = None
        if self.name is None:
            return
        root = index.version_root(self.name)
        job = root.read_job()
        if job is None:
            raise OutputError(f"{index.storage.url}: {CURRENT_FILE} names {self.name}, which has no _job.json; "
                              "the index is damaged (was the version deleted by hand?)")
        self.job = job
        self.fingerprint = job["fingerprint"]
        self.fingerprint_id = job["fingerprint_id"]
        self.commits = root.read_planned_commits()
        self.digests = index.digests(self.name) or {}


@dataclasses.dataclass
class _Attempt:
    """What the reindex steps pass each other: the base, the version being built, the diff, the phase times."""

    index: IndexRoot
    base: _Base
    target: str
    kept: dict[str, ItemCommit]
    rebuild: list[WorkItem]
    counts: dict[str, int] | None
    attempt_state: dict[str, Any]
    resumed: bool
    full_reembed: bool
    started: float
    by_digest: int = 0
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    mark: float = 0.0

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self.mark, 3)
        self.mark = now


def _digests(cfg: ReindexJobConfig, items: list[WorkItem], fp_id: str) -> dict[str, str | None]:
    """Phase 1 (cluster): each readable item's content digest."""
    from pipelines.reindex.graph import build_digest_graph

    readable = [i for i in items if not i.bad_reason]
    if not readable:
        return {}
    return {row[ITEM]: row[CONTENT_DIGEST] for row in stream_rows(
        lambda: build_digest_graph(cfg.input, readable, fp_id, cfg.compute.io_num_cpus), cfg.run)}


def _diff(cfg: ReindexJobConfig, items: list[WorkItem], fp_id: str, by_source: dict[str, list[str]],
          index: IndexRoot, kept: dict[str, ItemCommit]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Phase 2 (cluster, one task per input file): exact counts, and per item the base files its moved
    unchanged documents carry from."""
    from pipelines.reindex.graph import build_diff_graph

    tasks = diff_tasks([i for i in items if not i.bad_reason], by_source)
    results = [json.loads(row[DIFF_JSON]) for row in stream_rows(
        lambda: build_diff_graph(cfg.input, tasks, fp_id, index.storage, cfg.compute.io_num_cpus), cfg.run)] \
        if tasks else []
    counts, moved = resolve(results)
    counts["unchanged"] += sum(c.rows for c in kept.values())
    counts["rejected"] += sum(c.rejected for c in kept.values())
    counts["files_rejected"] = sum(1 for i in items if i.bad_reason)
    return counts, moved


def _nothing_changed(counts: dict[str, int], base: _Base, kept: dict[str, ItemCommit]) -> bool:
    if counts["new"] or counts["changed"] or counts["deleted"]:
        return False
    base_rejected = sum(c.rejected for c in base.commits.values())
    base_bad = sum(1 for c in base.commits.values() if c.bad_file)
    bad_now = counts["files_rejected"] + sum(1 for c in kept.values() if c.bad_file)
    return counts["rejected"] == base_rejected and bad_now == base_bad


def _count_line(counts: dict[str, int]) -> str:
    if "reembedded" in counts:
        return (f"full re-embed {counts['reembedded']:,} (no per-document diff: every vector changes) · "
                f"rejected {counts['rejected']:,}")
    return " · ".join(f"{k} {counts.get(k, 0):,}" for k in CHANGE_KINDS)


def _phase_line(phases: dict[str, float]) -> str:
    return "reindex: time by phase: " + " · ".join(f"{p} {phases.get(p, 0.0):.1f}s" for p in PHASES)


def _vector_types(index: IndexRoot, carry_from: dict[str, list[str]],
                  columns: list[str]) -> dict[str, pa.DataType] | None:
    """The stored type of each vector column of the base (read from one base file's footer); None: no base file
    to carry from. The base has the same columns: its fingerprint, which names them, is this run's."""
    path = next((p for paths in carry_from.values() for p in paths), None)
    if path is None:
        return None
    with index.storage.fs.open(index.storage.path(path), "rb") as f:
        schema = pq.read_schema(f)
    return {c: schema.field(c).type for c in columns}


def _calibrated(cfg: ReindexJobConfig, plan: Plan, base: _Base, index: IndexRoot, stream: TextIO):
    """`cfg.index` with int8/uint8 ranges: the current version's where they reproduce its fingerprint (the same
    model and settings: unchanged documents carry their quantised vectors), else calibrated on this snapshot."""
    from pipelines.embed.graph import tokenizer_args
    from pipelines.embed.job import calibrate

    def fingerprint_of(index_cfg):
        return embed_fingerprint(cfg.model_copy(update={"index": index_cfg}).embed_config(index.storage.url))

    def compute(needed):
        embed_cfg = cfg.embed_config(index.storage.url)
        fingerprint = embed_fingerprint(embed_cfg)
        return calibrate(embed_cfg, plan, fingerprint, tokenizer_args(embed_cfg, fingerprint), needed)

    return calibrated(cfg.index, [(f"of {base.name}", base.job, "index")], fingerprint_of, compute, stream)


class ReindexJob(JobSpec):
    name = "reindex"
    config_type = ReindexJobConfig

    def preflight(self, cfg: ReindexJobConfig) -> None:
        preflight_model(cfg.model.path, cfg.model.dimensions,
                        cfg.embed_config(cfg.index.path).model_storage_options, cfg.model.revision)

    def _index(self, cfg: ReindexJobConfig) -> IndexRoot:
        return IndexRoot(self.lock_storage(cfg))

    def describe_dry_run(self, cfg: ReindexJobConfig, stream: TextIO) -> None:
        pointer = self._index(cfg).current()
        print(f"index: current version {pointer['version'] if pointer else 'none (the first run embeds everything)'}",
              file=stream, flush=True)

    def lock_storage(self, cfg: ReindexJobConfig) -> Storage:
        return Storage(cfg.index.path, cfg.index_storage_options)

    def output_url(self, cfg: ReindexJobConfig) -> str:
        return cfg.index.path

    def table_config(self, cfg: ReindexJobConfig):
        """`index.table`: one table per index, each published version an overwrite snapshot tagged with its name."""
        return cfg.index.table

    def plan(self, cfg: ReindexJobConfig, stream: TextIO) -> Plan:
        started = time.monotonic()
        plan = super().plan(cfg, stream)
        self._plan_s = round(time.monotonic() - started, 3)
        return plan

    def prepare(self, cfg: ReindexJobConfig, plan: Plan, stream: TextIO) -> Work | dict[str, Any]:
        started = time.monotonic()
        index = self._index(cfg)
        index.claim()  # before anything is discarded, built or published: a late publish fails its If-Match
        base = _Base(index)
        if cfg.index.needs_calibration():
            cfg = cfg.model_copy(update={"index": _calibrated(cfg, plan, base, index, stream)})
        fingerprint = embed_fingerprint(cfg.embed_config(index.storage.url))
        fp_id = fingerprint_id(fingerprint)
        same_model = base.name is not None and base.fingerprint_id == fp_id
        if base.name is not None and not same_model:
            print(f"reindex: the model or its settings differ from {base.name}'s "
                  f"({describe_difference(base.fingerprint, fingerprint)}): FULL RE-EMBED of every document",
                  file=stream, flush=True)
        by_id = {i.item_id: base.commits[i.item_id] for i in plan.items if same_model and i.item_id in base.commits}
        rebuild = [i for i in plan.items if i.item_id not in by_id]

        target, state = index.start_attempt(base.name, {"base": base.name, "fingerprint_id": fp_id,
                                                        "plan_digest": _plan_digest(plan)}, stream)
        resumed = "counts" in state or index.version_root(target).read_job() is not None
        attempt = _Attempt(index, base, target, {}, rebuild, state.get("counts"), state, resumed,
                           full_reembed=base.name is not None and not same_model, started=started,
                           phases={"plan": getattr(self, "_plan_s", 0.0)}, mark=started)
        attempt.lap("base")

        digests = index.digests(target) if resumed else None
        if digests is None:  # phase 1: every item not kept by its bytes gets a digest, which this version records
            digests = {**{i: base.digests.get(i) for i in by_id}, **_digests(cfg, rebuild, fp_id)}
            index.write_digests(target, digests)
        attempt.lap("digest")

        by_digest: dict[str, str] = state.get("kept_by_digest", {})
        moved: dict[str, list[str]] = state.get("moved", {})
        if "counts" not in state and same_model:  # a full re-embed needs no diff: every vector changes
            candidates = {k: c for k, c in base.commits.items() if k not in by_id}
            by_digest = keep_by_digest(rebuild, digests, candidates, base.digests)
        items = {i.item_id: i for i in plan.items}
        kept = {**by_id, **{n: kept_commit(base.commits[b], items[n], lambda p: p, base.name)
                            for n, b in by_digest.items()}}
        rebuild = [i for i in rebuild if i.item_id not in by_digest]
        used = set(by_id) | set(by_digest.values())
        by_source = base_files_by_source(base.name or "", {k: c for k, c in base.commits.items() if k not in used})
        if "counts" not in state and same_model:
            counts, moved = _diff(cfg, rebuild, fp_id, by_source, index, kept)
            state = {**state, "counts": counts, "kept_by_digest": by_digest, "moved": moved}
            index.write_attempt_state(target, state)
        attempt.lap("diff")
        attempt.kept, attempt.rebuild, attempt.by_digest = kept, rebuild, len(by_digest)
        attempt.counts, attempt.attempt_state = state.get("counts"), state
        print(f"reindex: {'resuming' if resumed else 'building'} {target} from "
              f"{base.name or 'nothing (first version)'}: {len(kept)} item(s) kept by reference ({len(by_id)} "
              f"unchanged in bytes, {len(by_digest)} by content digest), {len(rebuild)} to rebuild",
              file=stream, flush=True)
        counts = attempt.counts
        if counts is not None:
            print(f"reindex: diff against {base.name}: {_count_line(counts)}", file=stream, flush=True)
            if same_model and _nothing_changed(counts, base, kept):
                index.discard(target)
                print(f"reindex: nothing changed since {base.name}; nothing published, {base.name} stays current",
                      file=stream, flush=True)
                return {"published": None, "version": base.name, "base": base.name, "counts": counts,
                        "embedded_rows": 0, "items_by_reference": len(kept), "items_by_digest": len(by_digest),
                        "phases": attempt.phases,
                        "wall_s": round(time.monotonic() - started, 3)}

        from pipelines.reindex.graph import build_reindex_graph

        vroot = index.version_root(target)
        embed_cfg = cfg.embed_config(index.version_url(target))
        carry_from = None
        if same_model:
            carry_from = {i.item_id: sorted(set(by_source.get(i.rel, [])) | set(moved.get(i.item_id, [])))
                          for i in rebuild}
        vector_types = (_vector_types(index, carry_from, embed_cfg.output.vector_column_names())
                        if carry_from else None)
        rebased = {item: c.by_reference(lambda path: rebase(path, base.name, target), base.name)
                   for item, c in kept.items()}
        return Work(root=vroot, source=cfg.input, fingerprint=fingerprint, reused=rebased,
                    recorded=recorded_config(cfg),
                    build_graph=lambda todo, compute: build_reindex_graph(
                        embed_cfg.model_copy(update={"compute": compute}), todo, vroot.storage, fingerprint, fp_id,
                        carry_from, index.storage, vector_types),
                    state=attempt)

    def after_items(self, cfg: ReindexJobConfig, work: Work, outcome: ItemsOutcome, stream: TextIO) -> Totals:
        attempt: _Attempt = work.state
        attempt.lap("build")
        totals = Totals.of(outcome.commits.values())
        if attempt.counts is None:  # the first version (every live document is new), or a full re-embed
            base = attempt.base
            counts: dict[str, int] = ({**dict.fromkeys(CHANGE_KINDS, 0), "new": totals.rows} if base.name is None
                                      else {"reembedded": totals.rows,
                                            "base_rows": sum(c.rows for c in base.commits.values())})
            counts.update(rejected=totals.rejected, files_rejected=len(totals.rejected_files))
            attempt.index.write_attempt_state(attempt.target, {**attempt.attempt_state, "counts": counts})
            attempt.counts = counts
        return totals

    def after_close(self, cfg: ReindexJobConfig, work: Work, outcome: ItemsOutcome, totals: Totals,
                    stream: TextIO) -> dict[str, Any]:
        a: _Attempt = work.state
        a.lap("close")
        this_run = [c for item, c in outcome.commits.items() if item not in outcome.before]
        embedded = sum(c.rows - c.carried for c in this_run)
        embedded_total = totals.rows - totals.carried
        a.index.publish(a.target, {"base": a.base.name, "fingerprint_id": outcome.fingerprint_id,
                                   "rows": totals.rows, "counts": a.counts})
        a.lap("publish")
        wall = time.monotonic() - a.started
        live = max(totals.rows, 1)
        print(f"reindex: published {a.target} (base {a.base.name or 'none'}) · {_count_line(a.counts)} · "
              f"embedded {embedded_total:,} of {totals.rows:,} live document(s) "
              f"({100 * embedded_total / live:.1f}%; {embedded:,} in this run), carried {totals.carried:,} · "
              f"{len(a.kept)} item(s) by reference ({a.by_digest} by content digest), {len(a.rebuild)} rebuilt · "
              f"{format_duration(wall)}", file=stream, flush=True)
        print(_phase_line(a.phases), file=stream, flush=True)
        return {"published": a.target, "version": a.target, "base": a.base.name, "counts": a.counts,
                "embedded_rows": embedded, "embedded_rows_in_version": embedded_total,
                "carried_rows": totals.carried, "items_by_reference": len(a.kept), "items_by_digest": a.by_digest,
                "items_rebuilt": len(a.rebuild), "full_reembed": a.full_reembed, "phases": a.phases,
                "startup": outcome.startup.to_json(),
                "resumed": a.resumed, "totals": totals.to_json(), "wall_s": round(wall, 3)}


REINDEX = ReindexJob()


def run_reindex(cfg: ReindexJobConfig, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Publish the next version of `cfg.index.path` from the snapshot `cfg.input`; returns the run's summary."""
    return REINDEX.run(cfg, dry_run=dry_run, stream=stream)
