"""One job lifecycle, shared by every job: preflight → plan → dry run → lock → process items → after-items
step → close → summary.

A job is a small `JobSpec`: its config type, its preflight, its plan, what a run under the lock processes
(`Work`: the output root, the fingerprint, the graph builder) and what happens once every item is committed
(rerank ranks; reindex publishes). This module owns the rest: the lock, resume, the commit loop, progress,
the completeness check, `_SUCCESS`, the report and the summary.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar, TextIO

from common.credentials import without_credentials
from common.errors import OutputError
from pipelines.config import TARGET_FILE_MB, ComputeConfig, RunConfig, SourceConfig, TableConfig
from pipelines.fingerprint import fingerprint_id
from pipelines.input.plan import Plan, WorkItem, make_plan, planning_key
from pipelines.input.reading import read_item
from pipelines.output import table
from pipelines.output.committer import Committer
from pipelines.output.lock import OutputLock, held_epoch
from pipelines.output.merge import MergeStats, merge_item
from pipelines.output.pieces import write_file_reject
from pipelines.output.records import ItemCommit, Piece, Totals
from pipelines.output.report import REPORT_FILE, write_report
from pipelines.output.root import OutputRoot
from pipelines.cluster_view import dry_run_view, watch_pool
from pipelines.driver_session import stop_deferred
from pipelines.progress import Progress, Startup, startup_line
from pipelines.ray_runtime import last_ray_start, map_on_cluster, run_task, stream_rows, view_for_job
from pipelines.resources import PoolReport, dry_run_compute, fit_compute, size_pool
from pipelines.storage import Storage


class Prefetched:
    """A value that takes seconds and needs no Ray (the imports and the tokenizer a graph builder needs), computed
    on a thread from `start()` so that it loads while Ray starts instead of after; `get()` waits for it (and
    computes it there if it was never started), re-raising what it raised."""

    def __init__(self, compute: Callable[[], Any]):
        self._compute = compute
        self._future: Future | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._future is not None:
                return
            self._future = Future()
        threading.Thread(target=self._run, name="embedrank-prefetch", daemon=True).start()

    def _run(self) -> None:
        try:
            self._future.set_result(self._compute())
        except BaseException as exc:  # noqa: BLE001 - handed to `get`'s caller
            self._future.set_exception(exc)

    def get(self) -> Any:
        self.start()
        return self._future.result()


@dataclasses.dataclass
class Work:
    """What one run processes, decided under the lock: where it commits and how its graph is built."""

    root: OutputRoot
    source: SourceConfig
    fingerprint: dict[str, Any]
    build_graph: Callable[[list[WorkItem], ComputeConfig], Any]
    """The item graph of the items to process, its model pool as the compute section given (the run's, sized for
    the items left)."""
    reused: dict[str, ItemCommit] = dataclasses.field(default_factory=dict)
    """Commit records written as they are, without processing (a reindex's unchanged items)."""
    before_new_work: Callable[[], Any] | None = None
    prefetch: Callable[[], Any] | None = None
    """Called as soon as the run knows it has items to process, before Ray starts (`Prefetched.start`)."""
    reject_id_columns: tuple[str, ...] = ("id",)
    recorded: dict[str, Any] | None = None
    """The config `_job.json` records, where `prepare` completed it (int8/uint8 calibration ranges); None: the
    run's config as given."""
    state: Any = None
    """Whatever the job's own steps pass each other (a reindex: its base, target version and diff counts)."""


@dataclasses.dataclass
class ItemsOutcome:
    fingerprint_id: str
    progress: Progress
    commits: dict[str, ItemCommit]
    """Every item's commit record, earlier runs' and this run's (no second listing of `_commits/`)."""
    before: frozenset[str] = frozenset()
    """Items already committed when this run started."""
    startup: Startup = dataclasses.field(default_factory=Startup)
    """Where the run's first minute went (printed in the summary)."""
    merged: MergeStats = dataclasses.field(default_factory=MergeStats)
    """The items this run merged from several pieces, and what that cost."""


class JobSpec:
    """A job as the lifecycle runs it. Subclasses fill in the steps; `run` is the job's entry point."""

    name: ClassVar[str]
    """The job's command and progress label."""
    config_type: ClassVar[type]

    def preflight(self, cfg: Any) -> None:
        """Checks that need no Ray (the model exists and fits the settings)."""

    def plan(self, cfg: Any, stream: TextIO) -> Plan:
        plan = make_plan(cfg.input, previous=OutputRoot(self.lock_storage(cfg)).previous_plan(),  # reuse footers
                         on_cluster=map_on_cluster(cfg.run, stream))  # a new corpus' thousands: read by tasks
        print(plan.describe(), file=stream, flush=True)
        return plan

    def describe_dry_run(self, cfg: Any, stream: TextIO) -> None:
        """What a dry run prints besides the plan and the estimate."""

    def lock_storage(self, cfg: Any) -> Storage:
        raise NotImplementedError

    def prepare(self, cfg: Any, plan: Plan, stream: TextIO) -> Work | dict[str, Any]:
        """Under the lock: the work of this run, or a finished summary when there is nothing to do."""
        raise NotImplementedError

    def after_items(self, cfg: Any, work: Work, outcome: ItemsOutcome, stream: TextIO) -> Totals:
        """Once every item is committed (rank, carry bookkeeping); returns the run's totals."""
        return Totals.of(outcome.commits.values())

    def after_close(self, cfg: Any, work: Work, outcome: ItemsOutcome, totals: Totals,
                    stream: TextIO) -> dict[str, Any] | None:
        """After `_SUCCESS` (publish); a summary of its own replaces the default one."""
        return None

    def output_url(self, cfg: Any) -> str:
        return cfg.output.path

    def table_config(self, cfg: Any) -> TableConfig | None:
        """`output.table`: the Iceberg table the committed output is published to (None: none)."""
        return getattr(cfg.output, "table", None)

    progress_table: ClassVar[bool] = False
    """Whether the table is published every `publish_every_s` while items commit (embed), or only at the end."""

    def run(self, cfg: Any, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
        """Run (or resume) the job; returns its summary. Progress and summary go to `stream` (stderr)."""
        return run_job(self, cfg, dry_run=dry_run, stream=stream or sys.stderr)


def recorded_config(cfg: Any) -> dict[str, Any]:
    """The config as stored in `_job.json`, without credentials: storage options are never written, and an
    Iceberg catalog's properties lose their credential-named entries and any URL's password (`embedrank publish`
    and `gc` reopen the catalog from this record; pyiceberg fills those in from `~/.pyiceberg.yaml` or
    `PYICEBERG_CATALOG__<NAME>__<PROPERTY>` variables)."""
    data = cfg.model_dump(mode="json")
    for section in data.values():
        if isinstance(section, dict):
            section.pop("storage_options", None)
            catalog = (section.get("table") or {}).get("catalog")
            if catalog:
                catalog["properties"] = without_credentials(catalog["properties"])
    return data


def run_job(spec: JobSpec, cfg: Any, *, dry_run: bool, stream: TextIO) -> dict[str, Any]:
    startup = Startup()
    spec.preflight(cfg)
    plan = spec.plan(cfg, stream)
    if dry_run:
        spec.describe_dry_run(cfg, stream)
        return dry_run_summary(plan, dry_run_compute(cfg, lambda: dry_run_view(cfg.run)), stream)
    # `auto` decided and impossible requests refused before any output is touched; the pool is sized for an
    # autoscaler once the run knows how many items are left (`process_items`)
    view = view_for_job(cfg.run, stream)
    cfg = fit_compute(cfg, view, stream)
    with OutputLock(spec.lock_storage(cfg), cfg.run.lock_stale_s, stream,
                    allow_unconditional=cfg.run.allow_unconditional_store), \
            stop_deferred():  # the lock fences the roots' writes; a stop (signal) waits for the commit in hand
        lock_storage = spec.lock_storage(cfg)
        table_cfg = spec.table_config(cfg)
        if table_cfg is not None:  # before anything is deleted: a late publisher cannot commit over this run
            table.claim_tables(lock_storage, table_cfg)
        work = spec.prepare(cfg, plan, stream)
        if isinstance(work, dict):
            if table_cfg is not None:  # nothing to run: the table still converges to the committed set
                table.publish_output(spec.output_url(cfg), lock_storage.storage_options, table_cfg, stream)
            return work
        recorded = work.recorded if work.recorded is not None else recorded_config(cfg)
        on_commit = None
        if table_cfg is not None and spec.progress_table:
            on_commit = table.ProgressPublisher(table_cfg, work.root.storage, work.fingerprint,
                                                fingerprint_id(work.fingerprint), stream)
        outcome = process_items(plan=plan, work=work, recorded=recorded, run=cfg.run, label=spec.name,
                                stream=stream, startup=startup, target_file_mb=target_file_mb(cfg),
                                io_num_cpus=cfg.compute.io_num_cpus, on_commit=on_commit,
                                compute=cfg.compute, autoscaler=view.autoscaler)
        totals = dataclasses.replace(spec.after_items(cfg, work, outcome, stream),
                                     wall_s=round(outcome.progress.elapsed, 3))
        removed = close_output(work.root, outcome.commits, totals)
        own = spec.after_close(cfg, work, outcome, totals, stream)
        if table_cfg is not None:  # after _SUCCESS (a reindex: after its pointer swap): the committed set
            table.publish_output(spec.output_url(cfg), lock_storage.storage_options, table_cfg, stream)
    return own if own is not None else summarize(outcome, totals, spec.output_url(cfg), stream, removed)


def dry_run_summary(plan: Plan, compute: ComputeConfig, stream: TextIO) -> dict[str, Any]:
    """`--dry-run`: the plan's figures plus its GPU-hour and cost estimate (the plan itself is printed already)."""
    figures, line = plan.estimate(compute.estimate_tokens_per_gpu_s, compute.estimate_usd_per_gpu_hour,
                                  compute.max_replicas)
    print(line, file=stream, flush=True)
    return {**plan.summary(), **figures}


def _commit_empty_jsonl(committer: Committer, source: SourceConfig) -> list[ItemCommit]:
    """JSONL items that produced no piece may be empty files; those commit with no rows."""
    for state in list(committer.pending.values()):
        if state.rows is None and not state.pieces and read_item(state.item, source).num_rows == 0:
            state.rows = 0
    return committer.commit_empty()


def target_file_mb(cfg: Any) -> float:
    """The job's `output.target_file_mb` (a reindex's versions use the default)."""
    output = getattr(cfg, "output", None)
    return getattr(output, "target_file_mb", TARGET_FILE_MB)


def merge_on_cluster(storage: Storage, target_file_bytes: float,
                     num_cpus: float) -> Callable[[list[Piece]], list[Piece]]:
    """An item's merge as a cluster task, so the driver never holds an item's rows."""
    epoch = held_epoch(storage)
    return lambda pieces: run_task(merge_item, storage, pieces, target_file_bytes, epoch, num_cpus=num_cpus)


def process_items(*, plan: Plan, work: Work, recorded: dict[str, Any], run: RunConfig, label: str,
                  stream: TextIO, startup: Startup | None = None, target_file_mb: float = TARGET_FILE_MB,
                  io_num_cpus: float = 1.0, on_commit: Callable[[dict[str, ItemCommit]], None] | None = None,
                  compute: ComputeConfig, autoscaler: str = "none") -> ItemsOutcome:
    """Commit every item of `plan` exactly once, resuming from what is already committed; `startup` (the job's
    start-up phases) learns when Ray came up, the replicas' reports and the first item committed. Items that
    arrive in several pieces are merged into files of at most `target_file_mb` on the cluster before they
    commit. The graph's model pool is `compute` (fitted) sized for the items left and the cluster's `autoscaler`
    (`ClusterView.autoscaler`)."""
    startup = startup or Startup()
    root = work.root
    fp_id = fingerprint_id(work.fingerprint)
    existing = root.prepare(work.fingerprint, fp_id, plan.items, recorded, plan_key=planning_key(work.source))
    before = frozenset(existing)
    fresh = [record for item, record in work.reused.items() if item not in existing]
    with ThreadPoolExecutor(max_workers=16) as pool:
        fresh = list(pool.map(root.write_commit, fresh))
    existing.update({r.item: r for r in fresh})
    todo = [i for i in plan.items if i.item_id not in existing]
    print(f"resume: {len(existing)} item(s) already committed, {len(todo)} to process", file=stream, flush=True)
    if todo and work.prefetch is not None:
        work.prefetch()
    if todo and work.before_new_work is not None:
        work.before_new_work()

    target_bytes = target_file_mb * 2**20
    committer = Committer(root, fp_id, todo, target_bytes, merge_on_cluster(root.storage, target_bytes, io_num_cpus))
    progress = Progress(len(plan.items), len(existing), plan.known_rows, run.progress_interval_s, stream, label)
    commits = dict(existing)

    def record(commit: ItemCommit) -> None:
        commits[commit.item] = commit
        progress.update(commit)
        if on_commit is not None:  # e.g. the Iceberg table's progress snapshot, every publish_every_s
            on_commit(commits)

    with progress.ticking():  # a line on a timer too: long items still show the job alive
        for commit in committer.commit_empty():
            record(commit)
        for commit in committer.commit_bad_files(
                lambda item: write_file_reject(root.storage, item.item_id, item.bad_reason, work.fingerprint,
                                               work.reject_id_columns, root.epoch)):
            record(commit)
        if committer.pending:
            pending = [s.item for s in committer.pending.values()]
            pool = size_pool(compute, autoscaler, len(pending), stream)
            progress.pool = PoolReport(pool.max_replicas)
            with watch_pool(progress.pool, lambda: len(committer.pending)):
                for row in stream_rows(lambda: work.build_graph(pending, pool), run, pool=progress.pool):
                    piece = Piece.from_row(row)
                    startup.note_replicas(piece.replica_startup)
                    for commit in committer.add(piece):
                        startup.note_item()
                        record(commit)
                for commit in committer.finish(run.stall_timeout_s):
                    startup.note_item()
                    record(commit)
        for commit in _commit_empty_jsonl(committer, work.source):
            record(commit)
    progress.close()
    ray_start = last_ray_start()
    if ray_start is not None:
        startup.note_ray(ray_start.how, ray_start.began, ray_start.ready)
    if committer.pending:
        unfinished = committer.unfinished()
        example = next(iter(unfinished.items()))
        raise OutputError(
            f"{len(unfinished)} work item(s) did not complete (e.g. {example[0]} with pieces {example[1]}); "
            "nothing partial was committed; rerun the same command to resume"
        )
    return ItemsOutcome(fp_id, progress, commits, before, startup, committer.merged)


def close_output(root: OutputRoot, commits: dict[str, ItemCommit], totals: Totals) -> list[str]:
    """End of a run, lock held: drop orphans, write `_SUCCESS` and the report; returns the orphans removed."""
    removed = root.remove_orphans(commits, planned=commits.keys())  # every planned item is committed by now
    root.write_commit_snapshot(commits)  # the next resume reads the records in one GET
    root.write_success(totals)
    write_report(root, commits, totals.wall_s)
    return removed


def summarize(outcome: ItemsOutcome, totals: Totals, output: str, stream: TextIO,
              removed: list[str]) -> dict[str, Any]:
    outcome.progress.print_line()
    summary = {**outcome.progress.summary(), "output": output, "totals": totals.to_json()}
    reasons = ", ".join(f"{r}={n}" for r, n in totals.reject_reasons.items()) or "none"
    print(f"done: {summary['items_processed']} item(s) processed, {summary['items_skipped']} skipped · "
          f"{totals.rows:,} rows committed · {totals.rejected:,} rejected ({reasons}) · "
          f"{totals.tokens:,} tokens · {outcome.progress.elapsed:.1f}s · output {output}",
          file=stream, flush=True)
    summary["merged"] = outcome.merged.to_json()
    if outcome.merged.items:
        print(outcome.merged.line(), file=stream, flush=True)
    if outcome.progress.pool is not None and outcome.progress.pool.samples:
        summary["pool"] = outcome.progress.pool.to_json()
        print(outcome.progress.pool.line(), file=stream, flush=True)
    summary["startup"] = outcome.startup.to_json()
    if summary["startup"]["first_item_s"] is not None:  # the pipeline ran (not only skipped or empty items)
        print(startup_line(summary["startup"]), file=stream, flush=True)
    if totals.rejected_files:
        print(f"WARNING: {len(totals.rejected_files)} file(s) rejected whole (see _rejects/): "
              + ", ".join(f"{f['file']} ({f['reason']})" for f in totals.rejected_files), file=stream, flush=True)
    print(f"report: {output.rstrip('/')}/{REPORT_FILE}", file=stream, flush=True)
    summary["orphans_removed_at_end"] = len(removed)
    return summary
