"""Failpoints for crash and hang tests, inert unless an environment variable names them (as databases do).

    EMBEDRANK_FAILPOINTS=before_piece_write,after_commit_write   names to fire (crash)
    EMBEDRANK_FAILPOINTS=replica_batch:hang@3                    hang on this process's 3rd hit
    EMBEDRANK_FAILPOINTS=replica_batch:delay=0.5                 sleep 0.5 s on every hit (a slow replica)
    EMBEDRANK_FAILPOINTS=before_orphan_delete:pause              freeze the whole process (SIGSTOP) on the 1st hit
    EMBEDRANK_FAILPOINT_DIR=/some/dir                             fire each name once only

A spec is `name[:action][@n]`. Action `crash` (the default) kills the process at
once (`os._exit(137)`, like SIGKILL: no cleanup, no finally blocks); `hang`
sleeps forever, as a wedged driver call or GPU would; `delay=S` sleeps S seconds
on every hit (`@n` and the marker dir do not apply), a slow stage that keeps a
pool busy without using CPU; `pause` prints `failpoint NAME: paused pid N` to
stderr and stops the whole process (SIGSTOP: every thread, the lock's heartbeat
too), as a VM suspend or a long GC pause does, until a SIGCONT wakes it. `@n` fires on the n-th hit in a process (default
the first). With EMBEDRANK_FAILPOINT_DIR set, a marker file there makes each
name fire only once across processes, so a retried task or a rerun gets through.
The points:

- before_piece_write   write task, before a piece file is written
- after_piece_write    write task, after its pieces are written, before it reports them
- before_commit_write  driver, before a commit record is written
- after_commit_write   driver, after a commit record is written, before the next piece is read
- replica_batch        model replica (embed or rerank actor), before it computes a batch
- before_pointer_write driver (reindex), after the version's `_SUCCESS`, before the index pointer names it
- rank_bucket          rank task (rerank phase 2), before it ranks and writes a bucket
- merge_write          merge task, after an item's merged files are written, before it reports them
- after_merge          driver, when an item's merge has returned, before its commit record is written

Check-then-act sites of the lock holder, each after its lease check and before the act it guards (the fencing
tests pause a writer there and wake it after another took the output over):

- before_job_write       prepare: before `_job.json` is written
- before_commit_create   commit: before the commit record is created
- before_orphan_delete   orphan sweep: before a batch of orphans is deleted
- before_discard_delete  reindex discard: after the tombstone, before the attempt's files are deleted
- before_gc_delete       gc: before a dropped version's files are deleted
- before_table_create    Iceberg claim or publication: no table found, before creating it
- before_table_commit    Iceberg publication: the snapshot planned and written, before the catalog's commit
- after_table_commit     Iceberg publication: after the catalog's commit (the table names the new set)
"""

from __future__ import annotations

import collections
import os
import time

POINTS = ("before_piece_write", "after_piece_write", "before_commit_write", "after_commit_write", "replica_batch",
          "before_pointer_write", "rank_bucket", "merge_write", "after_merge", "before_job_write",
          "before_commit_create", "before_orphan_delete", "before_discard_delete", "before_gc_delete",
          "before_table_create", "before_table_commit", "after_table_commit")
_hits: collections.Counter[str] = collections.Counter()


def _spec(name: str) -> tuple[str, int] | None:
    for entry in os.environ.get("EMBEDRANK_FAILPOINTS", "").split(","):
        spec, _, nth = entry.strip().partition("@")
        point, _, action = spec.partition(":")
        if point == name:
            return action or "crash", int(nth or 1)
    return None


def hit(name: str) -> None:
    spec = _spec(name)
    if spec is None:
        return
    action, nth = spec
    if action.startswith("delay="):
        time.sleep(float(action[len("delay="):]))
        return
    _hits[name] += 1
    if _hits[name] != nth:
        return
    marker_dir = os.environ.get("EMBEDRANK_FAILPOINT_DIR")
    if marker_dir:
        try:
            os.close(os.open(os.path.join(marker_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if action == "hang":
        while True:
            time.sleep(3600)
    if action == "pause":
        import signal
        import sys

        print(f"failpoint {name}: paused pid {os.getpid()}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    os._exit(137)
