"""Driver A of the late-writer tests: holds the real lock on an output and does one step of a job with the
project's own classes, pausing at a failpoint (`EMBEDRANK_FAILPOINTS=<point>:pause` stops the whole process,
heartbeat included) until the test wakes it after driver B took the output over.

Run in a pid namespace of its own (`namespaced`): a paused process of the same machine is alive, and a live
owner is never taken over; from another namespace (a container, another machine) liveness cannot be seen,
so B judges A by its heartbeat alone, as a driver on another machine is judged.

    python -m support.late_writer STORY URL   (STORAGE_OPTIONS and LOCK_STALE_S in the environment)

Exit status: 0 done, 4 lease lost (`LockLost`), 2 refused (`OutputError`).
"""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa

from common.errors import LockLost, OutputError
from pipelines.input.plan import WorkItem
from pipelines.output.lock import OutputLock, held_epoch
from pipelines.output.pieces import put_piece
from pipelines.output.records import ItemCommit, Piece, Totals
from pipelines.output.root import OutputRoot
from pipelines.storage import Storage

FP = {"model": "late-writer-test"}
FP_ID = "fpid-late-writer"


def namespaced(argv: list[str]) -> list[str]:
    """`argv` run in a new pid namespace (and /proc), under a shell so the command is not the namespace's init
    (which ignores a SIGSTOP it sends itself)."""
    return ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", '"$@"; exit $?', "sh", *argv]


def item(n: int) -> WorkItem:
    return WorkItem(item_id=f"{n:020x}", url=f"/in/f{n}.parquet", rel=f"f{n}.parquet", format="parquet",
                    row_start=0, row_end=3, row_groups=None, est_tokens=3, size=1, version="1")


def table(n: int, salt: float = 0.0) -> pa.Table:
    values = [0.1 * n + salt] * 6
    return pa.table({"id": [f"d{n}-{i}" for i in range(3)],
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), 2)})


def write_piece(storage: Storage, it: WorkItem, salt: float = 0.0) -> Piece:
    """What a write task of the lock holder does for the item's three rows."""
    n = int(it.item_id, 16)
    ref = put_piece(storage, "data", f"{it.item_id}-0-2", table(n, salt), json.dumps(FP, sort_keys=True),
                    held_epoch(storage))
    return Piece(item=it.item_id, start=0, end=3, item_rows=3, data_files=(ref,))


def commit_of(it: WorkItem, pieces: list[Piece]) -> ItemCommit:
    return ItemCommit.of_pieces(item=it.item_id, fingerprint_id=FP_ID, source=it.rel, row_start=0, row_end=3,
                                pieces=pieces)


def run_output(root: OutputRoot, items: list[WorkItem], salt: float = 0.0,
               recorded: dict | None = None) -> dict[str, ItemCommit]:
    """A whole run of the commit protocol on `root` (the lock held): prepare, every item, close. `recorded`: the
    config `_job.json` records (e.g. an `output.table` section for `embedrank publish`)."""
    commits = root.prepare(FP, FP_ID, items, recorded or {"test": True}, None)
    for it in items:
        if it.item_id not in commits:
            commits[it.item_id] = root.write_commit(commit_of(it, [write_piece(root.storage, it, salt)]))
    root.remove_orphans(commits, planned=commits.keys())
    root.write_commit_snapshot(commits)
    root.write_success(Totals.of(commits.values()))
    return commits


def attempt(plan: str) -> dict[str, str | None]:
    return {"base": "v000001", "fingerprint_id": FP_ID, "plan_digest": plan}


def main(story: str, url: str) -> int:
    from pipelines.reindex.index import IndexRoot

    storage = Storage(url, json.loads(os.environ.get("STORAGE_OPTIONS", "{}")))
    lock = OutputLock(storage, float(os.environ["LOCK_STALE_S"]), stream=sys.stdout).acquire()
    print(f"A: holds the lock, epoch {lock.epoch}", flush=True)
    root, index = OutputRoot(storage), IndexRoot(storage)
    try:
        if story == "sweep":  # A's plan lacks item 1: its old piece is an orphan to A
            run_output(root, [item(2)])
        elif story == "discard":  # A discards the stale unpublished v000002, then builds its own attempt
            index.claim()
            index.start_attempt("v000001", attempt("A"), sys.stdout)
        elif story == "publish":  # A builds v000002 and publishes it
            index.claim()
            target, _ = index.start_attempt("v000001", attempt("A"), sys.stdout)
            run_output(index.version_root(target), [item(1), item(2)])
            index.publish(target, {"rows": 6})
        elif story == "commit":  # A writes item 1's piece, then its record
            root.prepare(FP, FP_ID, [item(1)], {"test": True}, None)
            root.write_commit(commit_of(item(1), [write_piece(storage, item(1))]))
        elif story == "table":  # A commits items 1-3 and publishes them to the Iceberg table (TABLE_CONFIG)
            from pipelines.config import TableConfig
            from pipelines.output.table import claim_tables, publish_output

            cfg = TableConfig.model_validate(json.loads(os.environ["TABLE_CONFIG"]))
            claim_tables(storage, cfg)
            run_output(root, [item(1), item(2), item(3)], recorded={"output": {"table": cfg.model_dump()}})
            publish_output(url, storage.storage_options, cfg)
        elif story == "job":  # A plans item 1 only
            run_output(root, [item(1)])
        elif story == "live":  # A commits until told to stop, heartbeating; its lock must never be taken over
            for n in range(100, 1000):
                root.write_commit(commit_of(item(n), []))
                if storage.exists("_stop_live"):
                    break
                __import__("time").sleep(0.1)
        else:
            raise SystemExit(f"unknown story {story!r}")
    except LockLost as exc:
        print(f"A: LockLost: {exc}", flush=True)
        return 4
    except OutputError as exc:
        print(f"A: OutputError: {exc}", flush=True)
        return 2
    print("A: done", flush=True)
    lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
