"""A writer that wakes late can neither delete, hide nor re-point what another committed (issue 21's six stories).

Each test runs driver A (`support.late_writer`) as its own process in a pid namespace of its own, holding the
real lock, and pauses it (SIGSTOP, heartbeat included) at a check-then-act site: after its lease check, before
the act. Driver B, this process, takes the output over through the real stale takeover, does what a resumed
job does, and wakes A. What must hold: nothing committed is lost, no reader sees a partial view, verify passes,
and the next run converges. Local disk and the S3 server alike.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import OutputError
from pipelines.output.lock import LOCK_FILE, OutputLock
from pipelines.output.reader import read_committed
from pipelines.output.records import ItemCommit
from pipelines.output.root import COMMITS_DIR, JOB_FILE, OutputRoot
from pipelines.output.verify import verify_output
from pipelines.reindex.index import IndexRoot
from pipelines.storage import Storage
from support.late_writer import FP_ID, attempt, commit_of, item, namespaced, run_output, write_piece

pytestmark = pytest.mark.slow  # driver A is a process of its own in each story

STALE_S = 1.0
REPO = Path(__file__).resolve().parents[3]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except FileNotFoundError:
                kids = []
            found += kids
            todo += kids
    return found


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


class DriverA:
    """Driver A as a process paused at `point`; `wake()` lets it go on, `finish()` returns its exit status."""

    def __init__(self, story: str, storage: Storage, point: str, stale_s: float = STALE_S, env: dict | None = None):
        env = {**os.environ, **(env or {}), "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
               "STORAGE_OPTIONS": json.dumps(storage.storage_options), "LOCK_STALE_S": str(stale_s),
               "EMBEDRANK_FAILPOINTS": f"{point}:pause" if point else ""}
        self.proc = subprocess.Popen(namespaced([sys.executable, "-m", "support.late_writer", story, storage.url]),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.paused: list[int] = []

    def wait_paused(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.paused = [p for p in _descendants(self.proc.pid) if _state(p) == "T"]
            if self.paused:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"A ended before its failpoint: {self.proc.communicate()[0][-3000:]}")
            time.sleep(0.02)
        raise AssertionError("A did not reach its failpoint")

    def wake(self) -> None:
        for pid in self.paused:
            os.kill(pid, signal.SIGCONT)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"A did not finish: {self.proc.communicate()[0][-3000:]}") from None
        return self.proc.returncode, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.wake()
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def driver_a():
    started: list[DriverA] = []

    def start(*args, **kwargs) -> DriverA:
        a = DriverA(*args, **kwargs)
        started.append(a)
        a.wait_paused()
        return a

    yield start
    for a in started:
        a.kill()


def take_over(storage: Storage) -> OutputLock:
    """B: the real takeover of A's lock, once A's heartbeat looks stale (it then watches it for STALE_S more)."""
    time.sleep(STALE_S + 0.2)
    return OutputLock(storage, STALE_S, stream=sys.stderr).acquire()


def ids(url: str, options: dict) -> list[str]:
    return sorted(read_committed(url, options).column("id").to_pylist())


def rows_of(*numbers: int) -> list[str]:
    return sorted(f"d{n}-{i}" for n in numbers for i in range(3))


def test_a_late_orphan_sweep_cannot_delete_a_recommitted_file(store, driver_a):
    """Story 1: A lists item 1's old piece as an orphan (its plan lacks item 1) and pauses before deleting it; B
    recomputes item 1 byte for byte and commits it. A wakes and deletes what it listed: B's file has another name
    (B's epoch), so B's commit stands."""
    old = write_piece(store, item(1)).data_files[0].path  # a crashed run's piece, epoch 0
    a = driver_a("sweep", store, "before_orphan_delete")
    lock = take_over(store)
    try:
        commits = run_output(OutputRoot(store), [item(1), item(2)])
    finally:
        lock.release()
    mine = commits[item(1).item_id].files[0].path
    assert mine != old and mine.endswith(".parquet") and f"-e{lock.epoch}-" in mine  # same bytes, another name
    a.wake()
    code, out = a.finish()
    assert code in (0, 4), out
    assert store.exists(mine)
    assert verify_output(store.url, store.storage_options).ok
    assert ids(store.url, store.storage_options) == rows_of(1, 2)


def _published_v1(store: Storage) -> IndexRoot:
    index = IndexRoot(store)
    with OutputLock(store, STALE_S):
        index.claim()
        target, _ = index.start_attempt(None, attempt("v1") | {"base": None}, sys.stderr)
        run_output(index.version_root(target), [item(1)])
        index.publish(target, {"rows": 3})
    return IndexRoot(store)


def test_a_late_discard_cannot_wipe_a_published_version(store, driver_a):
    """Story 2: A, inside the discard of a stale unpublished v000002 (tombstoned, files listed), pauses before
    deleting; B builds and publishes its version. A wakes and deletes the stale attempt's files: the published
    version is another folder (numbers are never reused), and gc afterwards keeps what the pointer names."""
    _published_v1(store)
    stale = Storage(f"{store.url}/v000002", store.storage_options)
    stale.write_bytes("_reindex.json", json.dumps(attempt("OLD")).encode())
    write_piece(stale, item(9))
    a = driver_a("discard", store, "before_discard_delete")
    lock = take_over(store)
    try:
        index = IndexRoot(store)
        index.claim()
        target, _ = index.start_attempt("v000001", attempt("B"), sys.stderr)
        assert target == "v000003"  # v000002 is A's tombstone: never written into again
        run_output(index.version_root(target), [item(1), item(2)])
        index.publish(target, {"rows": 6})
    finally:
        lock.release()
    a.wake()
    code, out = a.finish()
    assert code == 4, out  # A's own attempt state would go over B's lease: refused
    assert IndexRoot(store).current()["version"] == "v000003"
    assert ids(store.url, store.storage_options) == rows_of(1, 2)
    assert verify_output(store.url, store.storage_options).ok
    with OutputLock(store, STALE_S):
        IndexRoot(store).gc(1, sys.stderr)
    assert ids(store.url, store.storage_options) == rows_of(1, 2)
    assert verify_output(store.url, store.storage_options).ok


def test_a_late_publish_cannot_point_readers_at_a_version_being_rebuilt(store, driver_a):
    """Story 3: A built v000002 and pauses right before its pointer swap; B takes over (claiming the pointer),
    discards A's attempt and starts its own. A wakes: its If-Match fails, the pointer still names v000001."""
    _published_v1(store)
    a = driver_a("publish", store, "before_pointer_write")
    lock = take_over(store)
    try:
        index = IndexRoot(store)
        index.claim()
        target, _ = index.start_attempt("v000001", attempt("B"), sys.stderr)
        vroot = index.version_root(target)
        vroot.prepare({"model": "late-writer-test"}, FP_ID, [item(1), item(3), item(4)], {"test": True}, None)
        vroot.write_commit(commit_of(item(1), [write_piece(vroot.storage, item(1))]))  # 1 of 3 items
        a.wake()
        code, out = a.finish()
        assert code in (2, 4) and "refusing to publish" in out or "LockLost" in out, out
        assert IndexRoot(store).current()["version"] == "v000001"
        assert ids(store.url, store.storage_options) == rows_of(1)
        run_output(vroot, [item(1), item(3), item(4)])
        index.publish(target, {"rows": 9})
    finally:
        lock.release()
    assert IndexRoot(store).current()["version"] == target
    assert ids(store.url, store.storage_options) == rows_of(1, 3, 4)


def test_a_live_writer_is_never_taken_over_by_a_shorter_stale_time(tmp_path, store, driver_a):
    """Story 4: A runs with lock_stale_s 10 and heartbeats; a second job with lock_stale_s 0.5, or `gc
    --lock-stale-s 1`, is refused: the taker waits the owner's stale time, and a live owner of this machine is
    refused at once."""
    from pipelines.output.lock import machine_identity

    a = DriverA("live", store, "", stale_s=10.0)  # another pid namespace: judged by its heartbeat alone
    try:
        deadline = time.monotonic() + 30
        while not store.exists(LOCK_FILE) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)
        with pytest.raises(OutputError, match="being written by another job .*last heartbeat"):
            OutputLock(store, 0.5).acquire()
        held = json.loads(store.read_bytes(LOCK_FILE))
        assert held["stale_after_s"] == 10.0 and held["pid_ns"] != machine_identity()["pid_ns"]
        gc = subprocess.run([sys.executable, "-m", "pipelines.cli", "gc", store.url, "--keep", "1",
                             "--lock-stale-s", "1", *sum((["--storage-option", f"{k}={v}"] for k, v in
                                                          store.storage_options.items()), [])],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert gc.returncode == 2 and "being written by another job" in gc.stderr, gc.stderr[-2000:]
        assert a.proc.poll() is None  # A was alive and writing all along
        store.write_bytes("_stop_live", b"")
        code, out = a.finish(timeout=60)
        assert code == 0, out  # A kept its lease to the end
    finally:
        a.kill()
    with OutputLock(store, 60) as live:  # the same machine and namespace: refused at once, whatever the times
        with pytest.raises(OutputError, match="a live process of this machine"):
            OutputLock(store, 0.01).acquire()
    assert live.epoch == held["epoch"] + 1


def test_a_late_commit_names_only_files_that_exist(store, driver_a):
    """Story 5: A wrote item 1's piece and pauses after its lease check, before creating the record; B's sweep
    keeps a planned item's piece; A's record lands naming it, and B adopts it only because its file exists."""
    a = driver_a("commit", store, "before_commit_create")
    lock = take_over(store)
    try:
        root = OutputRoot(store)
        root.prepare({"model": "late-writer-test"}, FP_ID, [item(1)], {"test": True}, None)
        a.wake()
        code, out = a.finish()
        assert code == 0, out  # its record landed: create-once, nothing of B's there yet
        commits = run_output(root, [item(1)], salt=1e-7)  # B's own piece differs in its last bits
    finally:
        lock.release()
    record = commits[item(1).item_id]
    assert store.exists(record.files[0].path)
    assert verify_output(store.url, store.storage_options).ok
    assert ids(store.url, store.storage_options) == rows_of(1)
    assert verify_output(store.url, store.storage_options).counts["orphans"] == 0  # B's copy was swept


def test_a_record_naming_missing_files_is_replaced_not_adopted(store):
    """A record of an older lease whose file is gone (swept after it landed late, or removed by hand): the next
    run treats the item as uncommitted and replaces the record (If-Match), never adopts it."""
    with OutputLock(store, 60):
        root = OutputRoot(store)
        first = run_output(root, [item(1), item(2)])
    store.delete([first[item(1).item_id].files[0].path])
    assert not verify_output(store.url, store.storage_options).ok
    with OutputLock(store, 60) as lock:
        root = OutputRoot(store)
        assert sorted(root.prepare({"model": "late-writer-test"}, FP_ID, [item(1), item(2)], {}, None)) == [
            item(2).item_id]
        again = run_output(root, [item(1), item(2)])
    replaced = ItemCommit.from_json(json.loads(store.read_bytes(f"{COMMITS_DIR}/{item(1).item_id}.json")))
    assert replaced == again[item(1).item_id] and replaced.epoch == lock.epoch and store.exists(
        replaced.files[0].path)
    assert verify_output(store.url, store.storage_options).ok
    assert ids(store.url, store.storage_options) == rows_of(1, 2)


def test_a_late_job_record_cannot_hide_a_newer_plan(store, driver_a):
    """Story 6: A pauses before writing `_job.json` (its plan: item 1 only); B plans items 1 and 2, commits both
    and finishes. A wakes: its write meets B's newer epoch and is refused; readers and verify see both items."""
    a = driver_a("job", store, "before_job_write")
    lock = take_over(store)
    try:
        run_output(OutputRoot(store), [item(1), item(2)])
    finally:
        lock.release()
    a.wake()
    code, out = a.finish()
    assert code == 4 and "newer lease" in out, out
    job = json.loads(store.read_bytes(JOB_FILE))
    assert job["plan"]["items"] == 2 and job["epoch"] == lock.epoch
    assert OutputRoot(store).read_success() is not None
    assert ids(store.url, store.storage_options) == rows_of(1, 2)
    report = verify_output(store.url, store.storage_options, quick=True)
    assert report.ok and report.counts["items"] == 2


def test_a_late_success_does_not_finish_a_newer_run(store):
    """A `_SUCCESS` written late by a writer of an older lease, while a newer run is under way, does not say that
    run finished: it counts only with the epoch of the `_job.json` it closes."""
    from pipelines.output.control import write_control
    from pipelines.output.status import job_status

    with OutputLock(store, 60):
        run_output(OutputRoot(store), [item(1)])
    with OutputLock(store, 60) as lock:
        root = OutputRoot(store)
        root.prepare({"model": "late-writer-test"}, FP_ID, [item(1), item(2)], {}, None)
        assert root.read_success() is None  # the newer run removed the _SUCCESS it read
        write_control(store, "_SUCCESS", {"rows": 3}, lock.epoch - 1)  # the late write of the older lease
        assert store.exists("_SUCCESS") and root.read_success() is None
        assert not job_status(store.url, store.storage_options)["state"].startswith("finished")
        run_output(root, [item(1), item(2)])
        assert root.read_success()["rows"] == 6


def _table_config(store: Storage, tmp_path: Path):
    """The embedded catalog for a local output; for S3, a SQL catalog on SQLite here, its warehouse in the bucket."""
    from pipelines.config import TableConfig

    if store.is_local:
        return TableConfig(name="docs")
    bucket = store.url.removeprefix("s3://").split("/")[0]
    return TableConfig(name="docs", catalog={"name": "s3cat", "properties": {
        "type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"s3://{bucket}/warehouse"}})


def test_a_late_table_publisher_can_neither_roll_back_nor_duplicate_what_a_newer_holder_published(
        store, driver_a, tmp_path):
    """Story 7: A commits items 1-3 and plans the Iceberg snapshot that adds their files, then pauses before the
    catalog's commit. B takes over, claims the table (a snapshot of its epoch), adopts A's commits and publishes.
    A wakes: its commit's base is stale, so the catalog refuses it; re-planning, A finds B's newer epoch and
    stops. The table names exactly the committed files, once each, published by B."""
    from pipelines.output.reader import committed_files
    from pipelines.output.table import EPOCH, claim_tables, open_catalog, publish_output

    cfg = _table_config(store, tmp_path)
    a = driver_a("table", store, "before_table_commit", env={"TABLE_CONFIG": cfg.model_dump_json()})
    lock = take_over(store)
    try:
        claim_tables(store, cfg)
        run_output(OutputRoot(store), [item(1), item(2), item(3)])
        published = publish_output(store.url, store.storage_options, cfg)
    finally:
        lock.release()
    assert published["table"]["added"] == 3
    a.wake()
    code, out = a.finish()
    assert code == 4 and "newer lease" in out, out
    table = open_catalog(cfg, store).load_table(("embedrank", "docs"))
    files = [t.file.file_path for t in table.scan().plan_files()]
    assert sorted(files) == sorted(committed_files(store.url, store.storage_options)) and len(files) == 3
    assert table.current_snapshot().summary[EPOCH] == str(lock.epoch)
    assert max(int(s.summary[EPOCH]) for s in table.snapshots()) == lock.epoch


def test_a_late_publisher_that_meant_to_create_the_table_meets_the_newer_epoch(store, driver_a, tmp_path):
    """Story 8: no table exists yet. A, claiming at its start, finds none and pauses before creating it. B takes
    over and claims first: its claim creates the table (no columns yet) with an empty snapshot of B's epoch. A
    wakes while B still holds the output and has published nothing: the table it meant to create is there, with
    the newer epoch, so A stops. B's publication then gives the table the output's columns and exactly the
    committed files."""
    from pipelines.output.reader import committed_files
    from pipelines.output.table import EPOCH, claim_tables, open_catalog, publish_output

    cfg = _table_config(store, tmp_path)
    a = driver_a("table", store, "before_table_create", env={"TABLE_CONFIG": cfg.model_dump_json()})
    lock = take_over(store)
    try:
        claim_tables(store, cfg)
        for name in ("docs", "docs_rejects"):
            claimed = open_catalog(cfg, store).load_table(("embedrank", name))
            assert len(claimed.schema().fields) == 0  # columns come with the first committed file
            assert [s.summary[EPOCH] for s in claimed.snapshots()] == [str(lock.epoch)]
            assert list(claimed.scan().plan_files()) == []
        a.wake()
        code, out = a.finish()
        assert code == 4 and "newer lease" in out, out
        run_output(OutputRoot(store), [item(1), item(2), item(3)])
        published = publish_output(store.url, store.storage_options, cfg)
    finally:
        lock.release()
    assert published["table"]["added"] == 3
    table = open_catalog(cfg, store).load_table(("embedrank", "docs"))
    files = [t.file.file_path for t in table.scan().plan_files()]
    assert sorted(files) == sorted(committed_files(store.url, store.storage_options)) and len(files) == 3
    assert [f.name for f in table.schema().fields] == ["id", "embedding"]
    assert table.properties["embedrank.cast.embedding.duckdb"] == "CAST(embedding AS FLOAT[2])"
    assert sorted(table.scan().to_arrow().column("id").to_pylist()) == ids(store.url, store.storage_options)
    assert {s.summary[EPOCH] for s in table.snapshots()} == {str(lock.epoch)}
