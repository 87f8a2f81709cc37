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
5. Publish: `_SUCCESS` in the version, then the pointer, written last and atomically.
"""

from __future__ import annotations

import hashlib
import posixpath
import sys
import time
from typing import Any, TextIO

from pipelines.output.root import OutputRoot, totals
from pipelines.config import ReindexJobConfig
from pipelines.embed.job import close_output, dry_run_summary, preflight_model, recorded_config
from common.errors import OutputError
from pipelines.fingerprint import describe_difference, embed_fingerprint, fingerprint_id
from pipelines.reindex.index import CURRENT_FILE, IndexRoot, rebase
from pipelines.output.lock import OutputLock
from pipelines.input.plan import Plan, WorkItem, make_plan
from pipelines.progress import format_duration
from pipelines.reindex.stages import CHANGE_KINDS
from pipelines.lifecycle import process_items
from pipelines.storage import Storage


def _plan_digest(plan: Plan) -> str:
    return hashlib.sha256("\n".join(i.item_id for i in plan.items).encode()).hexdigest()[:24]


def _by_reference(commit: dict[str, Any], base: str, target: str) -> dict[str, Any]:
    """A base version's commit record for an unchanged item, naming the base's files from the new version."""
    moved = lambda files: [{**f, "path": rebase(f["path"], base, target)} for f in files]  # noqa: E731
    return {**commit, "files": moved(commit["files"]), "rejects": moved(commit["rejects"]),
            "carried": commit["rows"], "carried_from": base}


class _Base:
    """The current version as this run sees it: its fingerprint and commit records."""

    def __init__(self, index: IndexRoot):
        pointer = index.current()
        self.name: str | None = pointer["version"] if pointer else None
        self.fingerprint_id: str | None = None
        self.fingerprint: dict[str, Any] = {}
        self.commits: dict[str, dict[str, Any]] = {}
        if self.name is None:
            return
        root = index.version_root(self.name)
        job = root.read_job()
        if job is None:
            raise OutputError(f"{index.storage.url}: {CURRENT_FILE} names {self.name}, which has no _job.json; "
                              "the index is damaged (was the version deleted by hand?)")
        self.fingerprint = job["fingerprint"]
        self.fingerprint_id = job["fingerprint_id"]
        self.commits = root.read_commits([i["item_id"] for i in job["items"]])

    def files(self, exclude: set[str]) -> list[str]:
        """Data files (relative to the index root) of the base's items not in `exclude`."""
        return sorted(posixpath.normpath(posixpath.join(self.name or "", f["path"]))
                      for item, c in self.commits.items() if item not in exclude for f in c["files"])


def _diff(cfg: ReindexJobConfig, items: list[WorkItem], fp_id: str, base_files: list[str], index: IndexRoot,
          kept: dict[str, dict], stream: TextIO) -> dict[str, int]:
    from pipelines.graph import build_diff_graph
    from pipelines.ray_runtime import ensure_ray, quiet_ray_data
    from pipelines.watchdog import iter_batches_watched

    counts = dict.fromkeys(CHANGE_KINDS, 0)
    readable = [i for i in items if not i.bad_reason]
    if readable or base_files:
        ensure_ray(cfg.run.ray_address)
        quiet_ray_data()
        ds = build_diff_graph(cfg.input, readable, fp_id, base_files, index.storage, cfg.index.diff_partitions,
                              cfg.compute.io_num_cpus)
        started = last = time.monotonic()
        for batch in iter_batches_watched(ds, cfg.run.stall_timeout_s, cfg.run.startup_timeout_s,
                                          batch_format="pyarrow", batch_size=None):
            for kind in CHANGE_KINDS:
                counts[kind] += sum(batch.column(kind).to_pylist())
            if time.monotonic() - last >= cfg.run.progress_interval_s:
                last = time.monotonic()
                print(f"[diff] {sum(counts.values()):,} documents compared so far ({_count_line(counts)}) · "
                      f"{format_duration(last - started)}", file=stream, flush=True)
    counts["unchanged"] += sum(c["rows"] for c in kept.values())
    counts["rejected"] += sum(c["rejected"] for c in kept.values())
    counts["files_rejected"] = sum(1 for i in items if i.bad_reason)
    return counts


def _nothing_changed(counts: dict[str, int], base: _Base, kept: dict[str, dict]) -> bool:
    if counts["new"] or counts["changed"] or counts["deleted"]:
        return False
    base_rejected = sum(c["rejected"] for c in base.commits.values())
    base_bad = sum(1 for c in base.commits.values() if c.get("bad_file"))
    bad_now = counts["files_rejected"] + sum(1 for c in kept.values() if c.get("bad_file"))
    return counts["rejected"] == base_rejected and bad_now == base_bad


def _count_line(counts: dict[str, int]) -> str:
    if "reembedded" in counts:
        return (f"full re-embed {counts['reembedded']:,} (no per-document diff: every vector changes) · "
                f"rejected {counts['rejected']:,}")
    return " · ".join(f"{k} {counts.get(k, 0):,}" for k in CHANGE_KINDS)


def run_reindex(cfg: ReindexJobConfig, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Publish the next version of `cfg.index.path` from the snapshot `cfg.input`; returns the run's summary."""
    stream = stream or sys.stderr
    started = time.monotonic()
    preflight_model(cfg.model.path, cfg.model.dimensions, cfg.embed_config(cfg.index.path).model_storage_options,
                    cfg.model.revision)
    index = IndexRoot(Storage(cfg.index.path, cfg.index_storage_options))
    plan = make_plan(cfg.input)
    print(plan.describe(), file=stream, flush=True)
    if dry_run:
        pointer = index.current()
        print(f"index: current version {pointer['version'] if pointer else 'none (the first run embeds everything)'}",
              file=stream, flush=True)
        return dry_run_summary(plan, cfg.compute, stream)
    with OutputLock(index.storage, cfg.run.lock_stale_s, stream):
        return _reindex_locked(cfg, index, plan, started, stream)


def _reindex_locked(cfg: ReindexJobConfig, index: IndexRoot, plan: Plan, started: float,
                    stream: TextIO) -> dict[str, Any]:
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
    print(f"reindex: {'resuming' if resumed else 'building'} {target} from {base.name or 'nothing (first version)'}: "
          f"{len(kept)} item(s) unchanged (kept by reference), {len(rebuild)} to read", file=stream, flush=True)
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

    vroot: OutputRoot = index.version_root(target)
    before = set(vroot.commit_ids())

    from pipelines.graph import build_reindex_graph

    embed_cfg = cfg.embed_config(index.version_url(target))
    outcome = process_items(
        plan=plan, source=cfg.input, root=vroot, fingerprint=fingerprint, recorded_config=recorded_config(cfg),
        run=cfg.run, label="reindex", stream=stream,
        reused={item: _by_reference(c, base.name, target) for item, c in kept.items()},
        build_graph=lambda items: build_reindex_graph(embed_cfg, items, vroot.storage, fingerprint, fp_id,
                                                      base_files if same_model else [], index.storage,
                                                      cfg.index.diff_partitions))
    commits = outcome.commits
    all_totals = {**totals(list(commits.values())), "wall_s": round(outcome.progress.elapsed, 3)}
    if counts is None:  # the first version (every live document is new), or a full re-embed
        counts = {**dict.fromkeys(CHANGE_KINDS, 0), "new": all_totals["rows"]} if base.name is None else \
            {"reembedded": all_totals["rows"], "base_rows": sum(c["rows"] for c in base.commits.values())}
        counts.update(rejected=all_totals["rejected"], files_rejected=len(all_totals["rejected_files"]))
        index.write_attempt_state(target, {**state, "counts": counts})
    close_output(vroot, commits, all_totals)
    this_run = [c for item, c in commits.items() if item not in before]
    embedded = sum(c["rows"] - c.get("carried", 0) for c in this_run)
    embedded_total = all_totals["rows"] - all_totals["carried"]
    index.publish(target, {"base": base.name, "fingerprint_id": fp_id, "rows": all_totals["rows"], "counts": counts})
    wall = time.monotonic() - started
    live = max(all_totals["rows"], 1)
    print(f"reindex: published {target} (base {base.name or 'none'}) · {_count_line(counts)} · "
          f"embedded {embedded_total:,} of {all_totals['rows']:,} live document(s) ({100 * embedded_total / live:.1f}%;"
          f" {embedded:,} in this run), carried {all_totals['carried']:,} · {len(kept)} item(s) by reference, "
          f"{len(rebuild)} rebuilt · {format_duration(wall)}", file=stream, flush=True)
    return {"published": target, "version": target, "base": base.name, "counts": counts,
            "embedded_rows": embedded, "embedded_rows_in_version": embedded_total,
            "carried_rows": all_totals["carried"], "items_by_reference": len(kept), "items_rebuilt": len(rebuild),
            "full_reembed": base.name is not None and not same_model, "resumed": resumed,
            "totals": all_totals, "wall_s": round(wall, 3)}
