"""`embedrank reindex`: the next version of an index from a new snapshot, computing only what changed.

1. Plan the snapshot; read the current version (the pointer) and its commits.
2. Items whose input bytes and job fingerprint are unchanged are kept by reference: their commit records are
   copied with paths rebased to the old files (no read, no compute, no copy of vectors).
3. Diff, on the cluster: the other items' rows ⟗ the current version's other rows on id gives the counts of
   new, changed, unchanged, deleted and rejected documents. Nothing new, changed or deleted: nothing is
   published. With a changed fingerprint there is no diff: every vector changes (a full re-embed).
4. Build, on the cluster: those items' rows ⟕ the base's vectors on id; unchanged documents carry their
   vector, new and changed ones are embedded; each item commits exactly as in `embedrank embed` (so a rerun
   after a crash resumes the same unpublished version).
5. Publish (the step after close): `_SUCCESS` in the version, then the pointer, written last and atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import time
from typing import Any, TextIO

from common.errors import OutputError
from pipelines.embed.job import embed_fingerprint
from pipelines.fingerprint import describe_difference, fingerprint_id
from pipelines.input.plan import Plan, WorkItem
from pipelines.lifecycle import ItemsOutcome, JobSpec, Work
from pipelines.output.records import ItemCommit, Totals
from pipelines.preflight import preflight_model
from pipelines.progress import format_duration
from pipelines.ray_runtime import stream_rows
from pipelines.reindex.config import ReindexJobConfig
from pipelines.reindex.index import CURRENT_FILE, IndexRoot, rebase
from pipelines.reindex.stages import CHANGE_KINDS
from pipelines.storage import Storage


def _plan_digest(plan: Plan) -> str:
    return hashlib.sha256("\n".join(i.item_id for i in plan.items).encode()).hexdigest()[:24]


class _Base:
    """The current version as this run sees it: its fingerprint and commit records."""

    def __init__(self, index: IndexRoot):
        pointer = index.current()
        self.name: str | None = pointer["version"] if pointer else None
        self.fingerprint_id: str | None = None
        self.fingerprint: dict[str, Any] = {}
        self.commits: dict[str, ItemCommit] = {}
        if self.name is None:
            return
        root = index.version_root(self.name)
        job = root.read_job()
        if job is None:
            raise OutputError(f"{index.storage.url}: {CURRENT_FILE} names {self.name}, which has no _job.json; "
                              "the index is damaged (was the version deleted by hand?)")
        self.fingerprint = job["fingerprint"]
        self.fingerprint_id = job["fingerprint_id"]
        self.commits = root.read_planned_commits()

    def files(self, exclude: set[str]) -> list[str]:
        """Data files (relative to the index root) of the base's items not in `exclude`."""
        return sorted(posixpath.normpath(posixpath.join(self.name or "", f.path))
                      for item, c in self.commits.items() if item not in exclude for f in c.files)


@dataclasses.dataclass
class _Attempt:
    """What the reindex steps pass each other: the base, the version being built, the diff."""

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


def _diff(cfg: ReindexJobConfig, items: list[WorkItem], fp_id: str, base_files: list[str], index: IndexRoot,
          kept: dict[str, ItemCommit], stream: TextIO) -> dict[str, int]:
    from pipelines.reindex.graph import build_diff_graph

    counts = dict.fromkeys(CHANGE_KINDS, 0)
    readable = [i for i in items if not i.bad_reason]
    if readable or base_files:
        started = last = time.monotonic()
        for row in stream_rows(lambda: build_diff_graph(cfg.input, readable, fp_id, base_files, index.storage,
                                                        cfg.index.diff_partitions, cfg.compute.io_num_cpus), cfg.run):
            for kind in CHANGE_KINDS:
                counts[kind] += row[kind]
            if time.monotonic() - last >= cfg.run.progress_interval_s:
                last = time.monotonic()
                print(f"[diff] {sum(counts.values()):,} documents compared so far ({_count_line(counts)}) · "
                      f"{format_duration(last - started)}", file=stream, flush=True)
    counts["unchanged"] += sum(c.rows for c in kept.values())
    counts["rejected"] += sum(c.rejected for c in kept.values())
    counts["files_rejected"] = sum(1 for i in items if i.bad_reason)
    return counts


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

    def prepare(self, cfg: ReindexJobConfig, plan: Plan, stream: TextIO) -> Work | dict[str, Any]:
        started = time.monotonic()
        index = self._index(cfg)
        base = _Base(index)
        fingerprint = embed_fingerprint(cfg.embed_config(index.storage.url))
        fp_id = fingerprint_id(fingerprint)
        same_model = base.name is not None and base.fingerprint_id == fp_id
        if base.name is not None and not same_model:
            print(f"reindex: the model or its settings differ from {base.name}'s "
                  f"({describe_difference(base.fingerprint, fingerprint)}): FULL RE-EMBED of every document",
                  file=stream, flush=True)
        kept = {i.item_id: base.commits[i.item_id] for i in plan.items if same_model and i.item_id in base.commits}
        rebuild = [i for i in plan.items if i.item_id not in kept]
        base_files = base.files(exclude=set(kept))

        target, state = index.start_attempt(base.name, {"base": base.name, "fingerprint_id": fp_id,
                                                        "plan_digest": _plan_digest(plan)}, stream)
        resumed = "counts" in state or index.version_root(target).read_job() is not None
        print(f"reindex: {'resuming' if resumed else 'building'} {target} from "
              f"{base.name or 'nothing (first version)'}: {len(kept)} item(s) unchanged (kept by reference), "
              f"{len(rebuild)} to read", file=stream, flush=True)
        if "counts" not in state and same_model:  # a full re-embed needs no diff: every vector changes
            state = {**state, "counts": _diff(cfg, rebuild, fp_id, base_files, index, kept, stream)}
            index.write_attempt_state(target, state)
        counts = state.get("counts")
        if counts is not None:
            print(f"reindex: diff against {base.name}: {_count_line(counts)}", file=stream, flush=True)
            if same_model and _nothing_changed(counts, base, kept):
                index.discard(target)
                print(f"reindex: nothing changed since {base.name}; nothing published, {base.name} stays current",
                      file=stream, flush=True)
                return {"published": None, "version": base.name, "base": base.name, "counts": counts,
                        "embedded_rows": 0, "wall_s": round(time.monotonic() - started, 3)}

        from pipelines.reindex.graph import build_reindex_graph

        vroot = index.version_root(target)
        embed_cfg = cfg.embed_config(index.version_url(target))
        carry_from = base_files if same_model else []
        rebased = {item: c.by_reference(lambda path: rebase(path, base.name, target), base.name)
                   for item, c in kept.items()}
        return Work(root=vroot, source=cfg.input, fingerprint=fingerprint, reused=rebased,
                    build_graph=lambda items: build_reindex_graph(embed_cfg, items, vroot.storage, fingerprint, fp_id,
                                                                  carry_from, index.storage,
                                                                  cfg.index.diff_partitions),
                    state=_Attempt(index, base, target, kept, rebuild, counts, state, resumed,
                                   full_reembed=base.name is not None and not same_model, started=started))

    def after_items(self, cfg: ReindexJobConfig, work: Work, outcome: ItemsOutcome, stream: TextIO) -> Totals:
        attempt: _Attempt = work.state
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
        this_run = [c for item, c in outcome.commits.items() if item not in outcome.before]
        embedded = sum(c.rows - c.carried for c in this_run)
        embedded_total = totals.rows - totals.carried
        a.index.publish(a.target, {"base": a.base.name, "fingerprint_id": outcome.fingerprint_id,
                                   "rows": totals.rows, "counts": a.counts})
        wall = time.monotonic() - a.started
        live = max(totals.rows, 1)
        print(f"reindex: published {a.target} (base {a.base.name or 'none'}) · {_count_line(a.counts)} · "
              f"embedded {embedded_total:,} of {totals.rows:,} live document(s) "
              f"({100 * embedded_total / live:.1f}%; {embedded:,} in this run), carried {totals.carried:,} · "
              f"{len(a.kept)} item(s) by reference, {len(a.rebuild)} rebuilt · {format_duration(wall)}",
              file=stream, flush=True)
        return {"published": a.target, "version": a.target, "base": a.base.name, "counts": a.counts,
                "embedded_rows": embedded, "embedded_rows_in_version": embedded_total,
                "carried_rows": totals.carried, "items_by_reference": len(a.kept), "items_rebuilt": len(a.rebuild),
                "full_reembed": a.full_reembed,
                "resumed": a.resumed, "totals": totals.to_json(), "wall_s": round(wall, 3)}


REINDEX = ReindexJob()


def run_reindex(cfg: ReindexJobConfig, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Publish the next version of `cfg.index.path` from the snapshot `cfg.input`; returns the run's summary."""
    return REINDEX.run(cfg, dry_run=dry_run, stream=stream)
