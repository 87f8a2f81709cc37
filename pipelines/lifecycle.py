"""The part every job shares: plan → prepare the output → stream work items through a graph → commit.

A job supplies its fingerprint and a function that builds its Ray Data graph
over the items still to do; this module owns resume, the commit loop, progress
and the completeness check.
"""

from __future__ import annotations

import dataclasses
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TextIO

from pipelines.output.root import Committer, OutputRoot
from pipelines.config import RunConfig, SourceConfig
from common.errors import OutputError
from pipelines.fingerprint import fingerprint_id
from pipelines.input.plan import Plan, WorkItem
from pipelines.progress import Progress
from pipelines.input.reading import read_item
from pipelines.watchdog import iter_batches_watched
from pipelines.output.pieces import write_file_reject


@dataclasses.dataclass
class ItemsOutcome:
    fingerprint_id: str
    progress: Progress
    commits: dict[str, dict[str, Any]]
    """Every item's commit record, earlier runs' and this run's (no second listing of `_commits/`)."""


def _commit_empty_jsonl(committer: Committer, source: SourceConfig) -> list[dict[str, Any]]:
    """JSONL items that produced no piece may be empty files; those commit with no rows."""
    for state in list(committer.pending.values()):
        if state.rows is None and not state.pieces and read_item(state.item, source).num_rows == 0:
            state.rows = 0
    return committer.commit_empty()


def process_items(*, plan: Plan, source: SourceConfig, root: OutputRoot, fingerprint: dict[str, Any],
                  recorded_config: dict[str, Any], run: RunConfig,
                  build_graph: Callable[[list[WorkItem]], Any], label: str, stream: TextIO | None = None,
                  before_new_work: Callable[[], None] | None = None,
                  reject_id_columns: tuple[str, ...] = ("id",),
                  reused: dict[str, dict[str, Any]] | None = None) -> ItemsOutcome:
    """Commit every item of `plan` (made from `source`) exactly once, resuming from what is already committed.

    `reused` maps item ids to commit records written as they are, without processing (a reindex's unchanged
    items, naming an older version's files)."""
    stream = stream or sys.stderr
    fp_id = fingerprint_id(fingerprint)
    existing = root.prepare(fingerprint, fp_id, plan.items, recorded_config)
    fresh = [record for item, record in (reused or {}).items() if item not in existing]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(root.write_commit, fresh))
    existing.update({r["item"]: r for r in fresh})
    todo = [i for i in plan.items if i.item_id not in existing]
    print(f"resume: {len(existing)} item(s) already committed, {len(todo)} to process", file=stream, flush=True)
    if todo and before_new_work is not None:
        before_new_work()

    committer = Committer(root, fp_id, todo)
    progress = Progress(len(plan.items), len(existing), plan.known_rows, run.progress_interval_s, stream, label)
    commits = dict(existing)

    def record(commit: dict[str, Any]) -> None:
        commits[commit["item"]] = commit
        progress.update(commit)

    for commit in committer.commit_empty():
        record(commit)
    for commit in committer.commit_bad_files(
            lambda item: write_file_reject(root.storage, item.item_id, item.bad_reason, fingerprint,
                                           reject_id_columns)):
        record(commit)
    if committer.pending:
        from pipelines.ray_runtime import ensure_ray, quiet_ray_data

        ensure_ray(run.ray_address)
        quiet_ray_data()
        ds = build_graph([s.item for s in committer.pending.values()])
        for batch in iter_batches_watched(ds, run.stall_timeout_s, run.startup_timeout_s,
                                          batch_format="pyarrow", batch_size=None):
            for piece in batch.to_pylist():
                commit = committer.add(piece)
                if commit is not None:
                    record(commit)
    for commit in _commit_empty_jsonl(committer, source):
        record(commit)
    if committer.pending:
        unfinished = committer.group_unfinished()
        example = next(iter(unfinished.items()))
        raise OutputError(
            f"{len(unfinished)} work item(s) did not complete (e.g. {example[0]} with pieces {example[1]}); "
            "nothing partial was committed; rerun the same command to resume"
        )
    return ItemsOutcome(fp_id, progress, commits)
