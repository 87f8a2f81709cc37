"""Where a job stands, read from its output alone: safe while it runs, from any machine, and after it ends.

Everything comes from the control files the commit protocol writes anyway
(`_job.json`, `_plan/`, `_commits/`, `_lock.json`, `_SUCCESS`); nothing talks to Ray.
Counts are summed a plan shard at a time, so memory follows one shard's records, not the job's.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from typing import Any

from common.errors import OutputError
from pipelines.output import plan_store
from pipelines.output.index_pointer import current_version, version_folders, version_storage
from pipelines.output.lock import LOCK_FILE, is_released, owner_gone
from pipelines.output.records import ItemCommit, sum_reasons
from pipelines.output.root import JOB_FILE, OutputRoot
from pipelines.progress import format_duration
from pipelines.storage import Storage


def _when(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def _state(root: OutputRoot, job: dict[str, Any], lock: dict[str, Any] | None) -> tuple[str, float | None]:
    if root.read_success() is not None:
        return "finished", None
    if lock is None or is_released(lock):
        return "stopped (unfinished: rerun the job to resume)", None
    age = time.time() - float(lock.get("heartbeat", 0))
    if owner_gone(lock):
        return f"stopped (its driver {lock.get('owner')} is gone: rerun the job to resume)", age
    stale_s = float(job.get("config", {}).get("run", {}).get("lock_stale_s", 600))
    if age > stale_s:
        return f"stopped or cut off (last heartbeat of {lock.get('owner')} {age:.0f}s ago)", age
    return f"running on {lock.get('owner')} (heartbeat {age:.0f}s ago)", age


class _Sums:
    """What `status` reports of the commits, summed as they are read (no record is kept)."""

    def __init__(self, run_started: float):
        self.run_started = run_started
        self.items = self.rows = self.rejected = self.tokens = self.rejected_files = self.this_run_rows = 0
        self.reject_reasons: dict[str, int] = {}
        self.last: float | None = None

    def add(self, commits: Iterable[ItemCommit]) -> None:
        for c in commits:
            self.items += 1
            self.rows += c.rows
            self.rejected += c.rejected
            self.tokens += c.tokens
            self.rejected_files += c.bad_file is not None
            self.reject_reasons = sum_reasons([self.reject_reasons, c.reject_reasons])
            when = _when(c.committed_at)
            if when >= self.run_started:
                self.this_run_rows += c.rows + c.rejected
            self.last = when if self.last is None else max(self.last, when)


def _newest_version(storage: Storage) -> tuple[OutputRoot, dict[str, Any] | None]:
    """For an index root: the newest version (the one a running reindex builds) and what the pointer names."""
    versions = version_folders(storage)
    if not versions:
        return OutputRoot(storage), None
    current = current_version(storage)
    started = [v for v in versions if storage.exists(f"{v}/{JOB_FILE}")] or versions
    # a version whose run died before recording its work items (during its diff) has nothing to report yet
    return OutputRoot(version_storage(storage, started[-1])), {"version": started[-1], "current_version": current}


def job_status(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Items committed of planned, rows, rejects, last commit, throughput of the current run, ETA, state."""
    root = OutputRoot(Storage(output, storage_options))
    lock_root, version = root, None
    if not root.storage.exists(JOB_FILE):
        root, version = _newest_version(root.storage)
    job = root.read_job_header()
    if job is None:
        raise OutputError(f"{output}: no _job.json; not an embedrank output (or nothing was run yet)")
    plan = plan_store.header(job)
    run_started = _when(job["updated_at"])
    sums = _Sums(run_started)
    for shard in root.iter_planned_commits(job):
        sums.add(shard.values())
    lock = lock_root.read_json(LOCK_FILE)
    state, heartbeat_age = _state(root, job, lock)
    planned_rows = plan["known_rows"]
    last = sums.last
    rate = None
    if sums.this_run_rows and last and last > run_started:
        rate = sums.this_run_rows / (last - run_started)
    remaining = max(planned_rows - sums.rows - sums.rejected, 0)
    status = {
        "output": output, "task": job["fingerprint"].get("task"), "model": job["fingerprint"].get("model"),
        "state": state, "items_committed": sums.items, "items_total": plan["items"],
        "rows": sums.rows, "rejected": sums.rejected, "reject_reasons": sums.reject_reasons,
        "rejected_files": sums.rejected_files, "tokens": sums.tokens, "planned_rows": planned_rows,
        "run_started": job["updated_at"],
        "last_commit": dt.datetime.fromtimestamp(last, dt.timezone.utc).isoformat(timespec="seconds") if last else None,
        "rows_per_s": round(rate, 3) if rate else None,
        "eta_s": round(remaining / rate) if rate and state.startswith("running") else None,
        "heartbeat_age_s": round(heartbeat_age, 1) if heartbeat_age is not None else None,
        **(version or {}),
    }
    return status


def format_status(s: dict[str, Any]) -> str:
    pct = 100.0 * s["items_committed"] / s["items_total"] if s["items_total"] else 100.0
    reasons = ", ".join(f"{r}={n}" for r, n in s["reject_reasons"].items()) or "none"
    rate = f"{s['rows_per_s']:,.1f} rows/s this run" if s["rows_per_s"] else "no commits this run yet"
    lines = [
        f"{s['output']}: {s['task']} job with {s['model']} · {s['state']}"
        + (f" · building {s['version']} (current: {s['current_version'] or 'none'})"
           if s.get("version") and s["version"] != s.get("current_version") else
           f" · version {s['version']} (current)" if s.get("version") else ""),
        f"items {s['items_committed']}/{s['items_total']} ({pct:.0f}%) · rows {s['rows']:,} committed of "
        f"{s['planned_rows']:,} planned · {s['rejected']:,} rejected ({reasons})"
        + (f" · {s['rejected_files']} file(s) rejected whole" if s["rejected_files"] else ""),
        f"run started {s['run_started']} · last commit {s['last_commit'] or '-'} · {rate}"
        + (f" · ETA {format_duration(s['eta_s'])}" if s["eta_s"] is not None else ""),
    ]
    return "\n".join(lines)
