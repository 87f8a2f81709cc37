"""Fencing: one writer per output even when a driver pauses past `run.lock_stale_s` or two start together.

The lock is created with If-None-Match (local disk: an exclusive link), renewed and taken over by
compare-and-swap on its ETag; a driver that lost it stops with `LockLost` (exit status 4) before its next
commit, delete or pointer write; commit records are created with If-None-Match; the index pointer is swapped
with If-Match; a store that ignores the headers is refused after a probe. The last tests run real jobs as
processes and freeze one (SIGSTOP) while another takes over.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import LockLost, OutputError
from pipelines.config import RunConfig
from pipelines.output.lock import LOCK_FILE, OutputLock, fence
from pipelines.output.records import FileRef, ItemCommit
from pipelines.output.root import COMMITS_DIR, OutputRoot
from pipelines.reindex.index import IndexRoot
from pipelines.storage import PreconditionFailed, Storage
from support.jobs import job_summary
from support.late_writer import namespaced


def test_conditional_primitives(store):
    first = store.create("_x.json", b"one")
    with pytest.raises(PreconditionFailed):
        store.create("_x.json", b"two")
    assert store.read_versioned("_x.json") == (b"one", first)
    second = store.replace("_x.json", b"three", first)
    with pytest.raises(PreconditionFailed):  # a stale ETag
        store.replace("_x.json", b"four", first)
    with pytest.raises(PreconditionFailed):  # If-Match on an object that does not exist
        store.replace("_missing.json", b"four", first)
    assert store.read_versioned("_x.json") == (b"three", second) and store.read_versioned("_missing.json") is None
    assert not store.delete_if_match("_x.json", first) and store.exists("_x.json")
    assert store.delete_if_match("_x.json", second) and not store.exists("_x.json")
    assert store.list_files("") == []  # no temp file, no probe object left
    assert store.conditional_write_problem() is None


def test_a_store_that_ignores_the_headers_is_refused_naming_it(s3_bucket, monkeypatch):
    bucket, options = s3_bucket
    put = Storage._s3_put
    monkeypatch.setattr(Storage, "_s3_put", lambda self, rel, data, conditions: put(self, rel, data, {}))
    storage = Storage(f"s3://{bucket}/out", options)
    assert "accepted a second PUT with If-None-Match" in storage.conditional_write_problem()
    with pytest.raises(OutputError) as refused:
        OutputLock(storage, 60).acquire()
    message = str(refused.value)
    assert f"s3://{bucket}/out (endpoint {options['endpoint_url']})" in message
    assert "does not enforce conditional writes" in message and "run.allow_unconditional_store" in message
    assert storage.list_files("") == []  # the probe cleaned up after itself and no lock was written
    assert RunConfig().allow_unconditional_store is False and RunConfig.model_fields[
        "allow_unconditional_store"].description
    with OutputLock(storage, 60, allow_unconditional=True):  # the explicit opt-out
        assert storage.exists(LOCK_FILE)
    assert json.loads(storage.read_bytes(LOCK_FILE))["released"] is True


def test_a_live_owner_refuses_a_second_writer(store):
    with OutputLock(store, 60) as owner:
        with pytest.raises(OutputError, match=rf"being written by another job \({owner.owner}, a live process of "
                                              "this machine"):
            OutputLock(store, 60).acquire()
        owner.check()
    assert json.loads(store.read_bytes(LOCK_FILE))["released"] is True


def _race(acquirers: list[OutputLock]) -> tuple[list[OutputLock], list[BaseException]]:
    """Every acquirer at once (a barrier, then acquire); returns the winners and the refusals."""
    barrier = threading.Barrier(len(acquirers))
    won: list[OutputLock] = []
    refused: list[BaseException] = []

    def go(lock: OutputLock) -> None:
        barrier.wait()
        try:
            won.append(lock.acquire())
        except OutputError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=go, args=(lock,)) for lock in acquirers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, refused


def test_of_concurrent_acquirers_exactly_one_wins(store):
    won, refused = _race([OutputLock(store, 60) for _ in range(4)])
    try:
        assert len(won) == 1 and len(refused) == 3, refused
        assert all("being written by another job" in str(e) for e in refused)
        assert json.loads(store.read_bytes(LOCK_FILE))["token"] == won[0].token
        won[0].check()
    finally:
        for lock in won:
            lock.release()


def test_of_two_drivers_taking_over_a_stale_lock_exactly_one_wins(store):
    store.create(LOCK_FILE, json.dumps({"token": "dead", "owner": "other-host pid 1", "heartbeat": 0}).encode())
    won, refused = _race([OutputLock(store, 0.6) for _ in range(2)])
    try:
        assert len(won) == 1 and len(refused) == 1, refused
        assert "took the lock at the same moment" in str(refused[0]) or "changed while this job watched" in str(
            refused[0])
        won[0].check()
    finally:
        for lock in won:
            lock.release()


def test_a_retried_put_that_already_landed_is_recognised(tmp_path, monkeypatch):
    """A PUT whose response was lost lands, and its retry fails the precondition (an s3fs/botocore retry): the
    lock reads its own token back instead of refusing, or of losing the lock it holds."""
    store = Storage(str(tmp_path / "out"))
    real_create, real_replace = Storage.create, Storage.replace

    def create_then_fail(self, rel, data):
        real_create(self, rel, data)
        raise PreconditionFailed("the retry found the object its first attempt created")

    def replace_then_fail(self, rel, data, etag):
        real_replace(self, rel, data, etag)
        raise PreconditionFailed("the retry found the ETag its first attempt wrote")

    monkeypatch.setattr(Storage, "create", create_then_fail)
    monkeypatch.setattr(Storage, "replace", replace_then_fail)
    lock = OutputLock(store, 60).acquire()
    try:
        assert lock.renew() and lock.lost is None
        lock.check()
        assert json.loads(store.read_bytes(LOCK_FILE))["beat"] == 2
    finally:
        lock.release()
    assert json.loads(store.read_bytes(LOCK_FILE))["released"] is True


def test_a_lost_heartbeat_stops_the_driver_before_its_next_write(store):
    lock = OutputLock(store, 1.0).acquire()
    try:
        _, etag = store.read_versioned(LOCK_FILE)
        # another driver takes the lock over (a compare-and-swap on the ETag, as a takeover does)
        store.replace(LOCK_FILE, json.dumps({"token": "other", "owner": "driver B", "heartbeat": time.time()}
                                            ).encode(), etag)
        deadline = time.monotonic() + 10
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "driver B took the lock over" in lock.lost
        root = OutputRoot(store)
        with pytest.raises(LockLost, match="lost its lock") as lost:
            root.write_commit(_commit("i1", "fp", "data/a.parquet"))
        assert lost.value.exit_code == 4
        with pytest.raises(LockLost):
            root.remove_orphans({})
        with pytest.raises(LockLost):  # an index version below the locked root is fenced too
            fence(Storage(store.url + "/v000001", store.storage_options))
        assert not store.exists(f"{COMMITS_DIR}/i1.json")
    finally:
        lock.release()
    assert json.loads(store.read_bytes(LOCK_FILE))["owner"] == "driver B"  # release left B's lock alone


def test_a_heartbeat_that_cannot_be_written_stops_the_driver(tmp_path, monkeypatch):
    store = Storage(str(tmp_path / "out"))
    lock = OutputLock(store, 0.4).acquire()
    try:
        def unreachable(self, rel):
            raise ConnectionError("store unreachable")

        monkeypatch.setattr(Storage, "read_versioned", unreachable)
        time.sleep(0.3)  # more than half the stale time without a successful beat
        with pytest.raises(LockLost, match="no heartbeat of this job's lock succeeded"):
            lock.check()
        assert lock.lost is None  # not known to be taken over: the store failed
        monkeypatch.undo()
        lock.check()  # the store answers again and nobody took over: the check renews the lock
    finally:
        lock.release()
    assert json.loads(store.read_bytes(LOCK_FILE))["released"] is True


def test_a_paused_owner_is_taken_over_and_fenced(store):
    """In one process: A's heartbeat stops (a pause), B waits until the lock did not change for the stale
    time, takes it over, and A's next write raises; a paused owner nobody took over just renews."""
    a = OutputLock(store, 0.6)
    a.machine = {"boot_id": "another-machine", "pid_ns": "pid:[1]"}  # a process of this machine is never taken over
    a.acquire()
    a._stop.set()
    a._thread.join()  # A is paused from here on: no heartbeat
    time.sleep(0.3)
    a.check()  # nobody took over: A's check renews the lock itself and goes on
    time.sleep(0.7)  # A's heartbeat timestamp is now stale by B's clock
    b = OutputLock(store, 0.6)
    started = time.monotonic()
    b.acquire()
    try:
        assert time.monotonic() - started >= 0.6  # B watched the lock for the whole stale time
        with pytest.raises(LockLost, match="took the lock over"):
            a.check()
        a.release()
        b.check()
        assert json.loads(store.read_bytes(LOCK_FILE))["token"] == b.token
    finally:
        b.release()


def _commit(item: str, fp: str, path: str) -> ItemCommit:
    return ItemCommit(item=item, fingerprint_id=fp, source="a.parquet", row_start=0, row_end=1,
                      files=(FileRef(path, 1, "0" * 64),), rows=1)


def test_a_commit_record_is_created_once(store):
    root = OutputRoot(store)
    mine = _commit("i1", "fp", "data/a.parquet")
    assert root.write_commit(mine) == mine
    other = _commit("i1", "fp", "data/b.parquet")  # another writer of the same item and job, second
    assert root.write_commit(other) == mine
    assert ItemCommit.from_json(json.loads(store.read_bytes(f"{COMMITS_DIR}/i1.json"))) == mine
    for path in ("data/a.parquet", "data/b.parquet"):
        store.write_bytes(path, b"x")
    # this writer's end-of-run cleanup keeps the files of the record it adopted (its own become orphans later)
    assert root.orphans([other]) == [] and OutputRoot(store).orphans([other]) == ["data/a.parquet"]
    with pytest.raises(OutputError, match="refusing to overwrite a commit record"):
        root.write_commit(_commit("i1", "another-fp", "data/c.parquet"))


def test_the_index_pointer_is_swapped_only_from_the_version_read(store):
    for name in ("v000001", "v000002"):
        store.write_bytes(f"{name}/_SUCCESS", b"{}")
    mine, theirs = IndexRoot(store), IndexRoot(store)
    assert mine.current() is None and theirs.current() is None
    theirs.publish("v000001", {})
    with pytest.raises(OutputError, match="changed since this run read it \\(now v000001, "):
        mine.publish("v000002", {})
    assert theirs.publish("v000002", {})["version"] == "v000002"
    assert IndexRoot(store).current()["version"] == "v000002"


# -- a real driver paused past run.lock_stale_s ----------------------------------------------------------------

STALE_S = 3.0
CONFIG = """
input: {{paths: ["{corpus}/*.parquet"], id_column: doc_id, rows_per_item: 10}}
model: {{path: "{model}", max_length: 32}}
output: {{path: "{out}", storage_options: {options}}}
compute: {{batch_rows: 10, min_replicas: 1, max_replicas: 1, num_cpus: 0.5, io_num_cpus: 0.25}}
run: {{progress_interval_s: 0.5, lock_stale_s: {stale}}}
"""


@pytest.fixture
def session_ray(ray_local):
    import ray

    return ray.get_runtime_context().gcs_address


def _job(tmp_path, model, out_url, options):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    ids = []
    for shard in range(4):
        doc_ids = [f"s{shard}-{i}" for i in range(60)]
        ids += doc_ids
        pq.write_table(pa.table({"doc_id": doc_ids, "text": [f"document {d} " + "word " * (i % 13)
                                                              for i, d in enumerate(doc_ids)]}),
                       corpus / f"part-{shard}.parquet", row_group_size=10)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(CONFIG.format(corpus=corpus, model=model, out=out_url, options=json.dumps(options), stale=STALE_S))
    return cfg, set(ids)


def _start(cfg, ray_address=None):
    """The job as a process: with `ray_address` it joins the session's Ray, else it starts a private one, in a pid
    namespace of its own (a container's or another machine's driver: a live process of this machine is never taken
    over, so only such a driver can be judged by its heartbeat)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "EMBEDRANK_"))}
    extra = ["--set", f"run.ray_address={ray_address}"] if ray_address else []
    argv = [sys.executable, "-m", "pipelines.cli", "embed", str(cfg), "--json", *extra]
    return subprocess.Popen(argv if ray_address else namespaced(argv), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=not ray_address)


def _finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the job did not finish: {proc.communicate()[1][-6000:]}") from None
    return proc.returncode, job_summary(proc.returncode, out), err


def _records(storage: Storage) -> list[str]:
    """The commit records in place (not a writer's `.tmp-…` file beside one, which a listing shows too)."""
    return [p for p in storage.list_files(COMMITS_DIR) if p.endswith(".json")]


def _snapshot(storage: Storage) -> dict[str, bytes]:
    return {p: storage.read_bytes(p) for p in _records(storage)}


def _paused_driver_scenario(tmp_path, model, out_url, options, session_ray):
    """A runs on a Ray of its own (its stages block on back-pressure while it is frozen and must not starve B);
    B joins the session's Ray."""
    from pipelines.output.reader import read_committed
    from pipelines.output.verify import verify_output

    cfg, ids = _job(tmp_path, model, out_url, options)
    storage = Storage(out_url, options)
    a = _start(cfg)
    phases, t0 = {}, time.monotonic()
    try:
        deadline = time.monotonic() + 240
        while a.poll() is None and time.monotonic() < deadline and not _records(storage):
            time.sleep(0.05)
        assert a.poll() is None, f"driver A finished before it could be paused: {a.communicate()[1][-3000:]}"
        os.killpg(a.pid, signal.SIGSTOP)  # driver A frozen after its first commit (a VM suspend, a GC pause)
        at_pause = len(_records(storage))
        phases["A to first commit"], t0 = time.monotonic() - t0, time.monotonic()
        time.sleep(STALE_S + 0.5)  # A's heartbeat looks stale now; B still watches the lock for STALE_S itself
        code_b, summary_b, err_b = _finish(_start(cfg, session_ray))
        assert code_b == 0, err_b
        assert "taking over a stale lock of" in err_b and "its lock did not change for" in err_b
        assert summary_b["items_skipped"] >= at_pause and summary_b["totals"]["rows"] == len(ids)
        after_b = _snapshot(storage)
        assert verify_output(out_url, options).ok
        phases["B (wait, takeover, run)"], t0 = time.monotonic() - t0, time.monotonic()
        os.killpg(a.pid, signal.SIGCONT)  # A wakes up, unaware
        code_a, _, err_a = _finish(a, timeout=120)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGCONT)
            os.killpg(a.pid, signal.SIGKILL)
            a.communicate()
    assert code_a == 4, err_a
    assert "lost its lock" in err_a and "stopped before its next commit, delete or pointer write" in err_a
    assert _snapshot(storage) == after_b  # A committed nothing more and replaced no record
    report = verify_output(out_url, options)
    # every committed file exists and matches its record; the only thing A may leave is piece files its
    # stages were already writing when it woke up (pieces are not fenced; no commit names them)
    assert [p for p in report.problems if "that no commit names" not in p] == [], report.problems
    got = read_committed(out_url, options).column("id").to_pylist()
    assert len(got) == len(set(got)) and set(got) == ids  # every input row committed exactly once
    zombies = report.counts["orphans"]
    phases["A to LockLost"], t0 = time.monotonic() - t0, time.monotonic()
    code_c, summary_c, err_c = _finish(_start(cfg, session_ray))  # the next run: nothing to do but clean up
    assert code_c == 0 and summary_c["items_processed"] == 0, err_c
    final = verify_output(out_url, options)
    assert final.ok and final.counts["orphans"] == 0, final.problems
    phases["rerun"] = time.monotonic() - t0
    return at_pause, zombies, phases


def _report(capsys, where, at_pause, zombies, phases):
    with capsys.disabled():
        print(f"\n{where}: driver A frozen with {at_pause} item(s) committed; B took over and finished; A stopped "
              f"with LockLost (exit 4), leaving {zombies} unnamed piece file(s) that the next run removed; "
              + ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()))


@pytest.mark.slow
def test_a_paused_driver_is_fenced_on_local_disk(tmp_path, tiny_embedding_model, session_ray, capsys):
    _report(capsys, "local disk", *_paused_driver_scenario(tmp_path, tiny_embedding_model, str(tmp_path / "out"),
                                                           {}, session_ray))


@pytest.mark.slow
def test_a_paused_driver_is_fenced_on_s3(tmp_path, tiny_embedding_model, session_ray, s3_bucket, capsys):
    bucket, options = s3_bucket
    _report(capsys, "S3", *_paused_driver_scenario(tmp_path, tiny_embedding_model, f"s3://{bucket}/out", options,
                                                   session_ray))
