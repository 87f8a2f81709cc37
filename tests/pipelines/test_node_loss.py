"""Node loss: a two-node Ray cluster loses its worker node (raylet, object store, every worker on it: SIGKILL, as a
preempted spot instance loses them) in the middle of a job; the same run finishes, every input row committed or
rejected exactly once, no orphan file left, and the output equal to a fault-free run's on the same cluster.

The cluster is Ray's own multi-node harness on loopback (`support.loopback_cluster`, every node on 127.0.0.1, the
multi-node switch off). Its head has no CPU, as the README's `cluster.yaml` head (Ray's control plane and the
driver's node only), and each worker node 2 CPUs: every read, tokenize, score, rank and write task and the model
replica can only run on the worker node, so killing it loses work in flight, not just an idle machine. The job runs
as its own process, joining the cluster by `run.ray_address` as a driver joins a cluster (`support.jobs`). A
failpoint that hangs (`EMBEDRANK_FAILPOINTS=<point>:hang`, firing once per job: `EMBEDRANK_FAILPOINT_DIR`) holds the
job at a known point on the worker node: only the node's death can release it. The node is killed there, a fresh
worker node joins (the spot replacement), and the job must get through on it by itself.

- embed: the replica hangs on its 5th batch (2 batches an item), and the node is killed once the items before it
  are committed: mid-embed, with the hung batch and the blocks queued for it in the lost node's workers and object
  store.
- rerank: the first rank task to start hangs (the rank phase starts only once every scoring item is committed in
  `_commits/`), and the node is killed once another bucket's ranks are committed (`_rank_commits/`): mid rank phase.

What Ray 2.60 does, found by running it and asserted precisely (a failed run followed by a rerun would fail these
tests): the same run finishes, exit 0, every item processed in it. The GCS marks the node dead (in ~2 s with the
cluster's `HEALTH_CHECK`); Ray Data's replica, an actor it starts with unlimited restarts and task retries, is
restarted on the new node (asserted from the GCS's actor table) and the batch it was running retried there; the rank
task that died with the node is resubmitted by Ray's own task retries. The driver, the single committer, commits each
item and bucket once whatever ran twice: phase 1's commits and the buckets ranked before the kill are unchanged.

Every listener and connection of the cluster's processes (GCS, raylets, agents, workers) and of the driver is on
127.0.0.1 throughout: a sampler reads their sockets from /proc while the job runs, through the kill and the
replacement node's start.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import job_process_env, job_summary, wait_or_kill
from support.loopback_cluster import LOOPBACK, LoopbackCluster, environ, off_loopback, v4
from support.sockets import ESTABLISHED, LISTEN, alive, descendant_pids, inet_sockets, start_time

from pipelines.output.reader import read_committed
from pipelines.output.root import COMMITS_DIR, RANK_COMMITS_DIR
from pipelines.output.verify import verify_output

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER_CPUS = 2
# one replica of 1 CPU beside two 0.5-CPU I/O tasks: all of it fits the worker node, none of it the 0-CPU head
COMPUTE = "{num_cpus: 1, min_replicas: 1, max_replicas: 1, io_num_cpus: 0.5, batch_rows: %d}"
EMBED_POOL = "MapWorker(MapBatches(EmbedReplica))"
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cluster():
    """The head (no CPU) for the module; each test adds its own worker node (`worker`)."""
    nodes = LoopbackCluster(head_cpus=0)
    try:
        yield nodes
    finally:
        nodes.shutdown()


@pytest.fixture
def worker(cluster):
    """A fresh 2-CPU worker node; at the end every worker node is removed (the replacement a test added too)."""
    node = cluster.add_worker(WORKER_CPUS)
    yield node
    for other in cluster.workers:
        cluster.remove(other)


class Job:
    """`embedrank <command> cfg --json` as its own process joining `cluster`; `failpoint` fires in its Ray
    workers, once (the marker dir)."""

    def __init__(self, command: str, cfg: pathlib.Path, cluster: LoopbackCluster, name: str,
                 failpoint: str | None = None):
        folder = cfg.parent
        self.markers = folder / f"{name}-markers"
        self.markers.mkdir()
        points = {"EMBEDRANK_FAILPOINTS": failpoint, "EMBEDRANK_FAILPOINT_DIR": str(self.markers)} if failpoint else {}
        env = {**job_process_env(worker_env=points or None), "RAY_AUTH_MODE": "disabled"}
        self.out, self.err = open(folder / f"{name}.out", "w+"), open(folder / f"{name}.err", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", command, str(cfg), "--json", "--set",
                                      f"run.ray_address={cluster.address}"],
                                     cwd=REPO, env=env, stdout=self.out, stderr=self.err, text=True)

    def fired(self) -> bool:
        return any(self.markers.iterdir())

    def workers_env(self) -> bytes:
        """What only this job's processes have in their environment: its runtime_env (its Ray workers get it)."""
        return f"EMBEDRANK_FAILPOINT_DIR={self.markers}".encode()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def finish(self) -> tuple[int, dict | None, str]:
        """Exit code, the `--json` summary (None unless it succeeded), stderr."""
        code = wait_or_kill(self.proc, JOB_TIMEOUT_S)
        self.out.seek(0)
        summary = job_summary(code, self.out.read())
        err = self.stderr()
        self.out.close()
        self.err.close()
        return code, summary, err


def run_clean(command: str, cfg: pathlib.Path, cluster: LoopbackCluster, name: str) -> dict:
    code, summary, err = Job(command, cfg, cluster, name).finish()
    assert code == 0, f"the fault-free run failed (exit {code}):\n{err[-3000:]}"
    return summary


def wait_until(job: Job, condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert job.proc.poll() is None, f"the job ended before {what}:\n{job.stderr()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s}s:\n{job.stderr()[-3000:]}"
        time.sleep(0.05)


def count(folder: pathlib.Path) -> int:
    return len(list(folder.glob("*.json"))) if folder.exists() else 0


class SocketWatch(threading.Thread):
    """Every 0.25 s, every socket of the cluster's processes and of the driver: any not on 127.0.0.1 is kept."""

    def __init__(self, cluster: LoopbackCluster, driver_pid: int):
        super().__init__(daemon=True)
        self.cluster, self.driver_pid = cluster, driver_pid
        self.stopped = threading.Event()
        self.samples = 0
        self.processes: set[int] = set()
        self.listening: set[tuple[str, int]] = set()
        self.driver_peers: set[tuple[str, int]] = set()
        self.off_loopback: set = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.error = exc

    def _watch(self) -> None:
        while not self.stopped.wait(0.25):
            try:
                pids = list(self.cluster.pids())
            except RuntimeError:  # the node set changed under us (a node being added or killed): next time
                continue
            driver = descendant_pids(self.driver_pid)
            socks = inet_sockets(pids + driver)
            self.samples += 1
            self.processes.update(pids + driver)
            self.off_loopback.update(s for s in socks if off_loopback(s))
            self.listening.update(v4(s.local) for s in socks if s.state == LISTEN)
            self.driver_peers.update(v4(s.remote) for s in inet_sockets(driver) if s.state == ESTABLISHED)

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)

    def check(self, cluster: LoopbackCluster) -> None:
        assert self.error is None, f"the socket sampler failed: {self.error!r}"
        assert self.samples >= 3 and len(self.processes) >= 8, (self.samples, self.processes)
        assert not self.off_loopback, f"sockets off loopback: {sorted(self.off_loopback)}"
        gcs = (LOOPBACK, int(cluster.address.rsplit(":", 1)[1]))
        assert gcs in self.listening and gcs in self.driver_peers, (gcs, self.listening, self.driver_peers)
        assert all(n["NodeManagerAddress"] == LOOPBACK for n in cluster.nodes()), cluster.nodes()


def lose_node(cluster: LoopbackCluster, node, job: Job) -> tuple:
    """Kill `node` under a running `job` and start its replacement; returns (replacement, seconds from the kill
    until the GCS had marked the node dead). Checks first that the job's Ray workers (its runtime_env in their
    environment) all run on `node`, and after, that every process of the node is gone, its workers included."""
    ours = [pid for pid in cluster.pids() if job.workers_env() in environ(pid)]
    victims = cluster.node_pids(node)
    elsewhere = [pid for pid in ours if pid not in victims and start_time(pid)]
    assert ours and not elsewhere, f"the job's workers {elsewhere} run off the worker node ({victims})"
    assert job.proc.poll() is None
    killed = time.monotonic()
    cluster.kill(node)
    replacement = cluster.add_worker(WORKER_CPUS)
    cluster.wait_dead(node)
    dead_s = time.monotonic() - killed
    gone_by = time.monotonic() + 30  # from the GCS's verdict: the replacement's start is not theirs to wait for
    while alive(victims):
        assert time.monotonic() < gone_by, f"processes of the lost node outlived it: {alive(victims)}"
        time.sleep(0.1)
    assert cluster.node_alive(replacement)
    return replacement, dead_s


def exactly_once(out: pathlib.Path, input_ids: set) -> None:
    """The invariant (`verify`), no orphan, and each input id committed or rejected, once."""
    report = verify_output(str(out))
    assert report.ok, report.problems
    assert report.counts["orphans"] == 0
    got = read_committed(str(out)).column("id").to_pylist()
    rejected = read_committed(str(out), rejects=True).column("id").to_pylist()
    assert len(got) == len(set(got)) and not set(got) & set(rejected)
    assert set(got) | set(rejected) == input_ids and len(got) + len(rejected) == len(input_ids)


def sorted_rows(table: pa.Table, *keys: str) -> list[dict]:
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


# --- embed: the worker node dies mid-embed ---------------------------------------------------------------------


@pytest.fixture
def embed_job(tmp_path, tiny_embedding_model):
    """6 work items of 20 rows (one null text each: rejects count too), each row embedded alone
    (`max_batch_tokens: 1`), so that a vector depends on its text only and a rerun equals it bit for bit."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    ids = set()
    for shard in range(3):
        texts = [f"document {shard}-{i} " + "word " * (i % 11) for i in range(40)]
        texts[7] = None
        doc_ids = [f"s{shard}-{i}" for i in range(40)]
        ids.update(doc_ids)
        pq.write_table(pa.table({"doc_id": doc_ids, "text": pa.array(texts, pa.string())}),
                       corpus / f"part-{shard}.parquet", row_group_size=20)

    def config(name: str) -> pathlib.Path:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"input: {{paths: ['{corpus}/*.parquet'], id_column: doc_id, rows_per_item: 20}}\n"
                       f"model: {{path: '{tiny_embedding_model}', max_length: 32, max_batch_tokens: 1}}\n"
                       f"output: {{path: '{tmp_path / name}'}}\ncompute: {COMPUTE % 10}\n"
                       "run: {progress_interval_s: 0.5}\n")
        return cfg

    return config, ids


def test_an_embed_job_survives_losing_its_worker_node_mid_embed(cluster, worker, embed_job, tmp_path, capsys):
    config, ids = embed_job
    started = time.monotonic()
    clean = run_clean("embed", config("clean"), cluster, "clean")
    clean_s = time.monotonic() - started

    before = set(cluster.actors())
    job = Job("embed", config("out"), cluster, "out", failpoint="replica_batch:hang@5")
    watch = SocketWatch(cluster, job.proc.pid)
    watch.start()
    try:
        commits = tmp_path / "out" / COMMITS_DIR
        wait_until(job, lambda: job.fired() and count(commits) >= 1, "hung replica after a commit")
        at_kill = count(commits)
        replicas = {aid: a for aid, a in cluster.actors().items() if aid not in before
                    and a["ActorClassName"] == EMBED_POOL and a["State"] == "ALIVE"}
        assert [a["Address"]["NodeID"] for a in replicas.values()] == [worker.node_id], replicas
        killed = time.monotonic()
        replacement, dead_s = lose_node(cluster, worker, job)
        code, summary, err = job.finish()
        after_kill_s = time.monotonic() - killed
    finally:
        watch.stop()
        if job.proc.poll() is None:
            job.proc.kill()

    assert 1 <= at_kill < 6, f"the kill did not land mid-embed: {at_kill} of 6 items committed"
    assert code == 0, f"the run that lost its worker node did not finish by itself (exit {code}):\n{err[-3000:]}"
    assert summary["items_processed"] == summary["items_total"] == 6 and summary["items_skipped"] == 0
    (aid, _), = replicas.items()
    restarted = cluster.actors()[aid]
    assert restarted["NumRestarts"] >= 1 and restarted["Address"]["NodeID"] == replacement.node_id, restarted

    out = tmp_path / "out"
    exactly_once(out, ids)
    assert sorted_rows(read_committed(str(out)), "id") == sorted_rows(read_committed(str(tmp_path / "clean")), "id")
    assert sorted_rows(read_committed(str(out), rejects=True), "item", "row") == sorted_rows(
        read_committed(str(tmp_path / "clean"), rejects=True), "item", "row")
    assert {k: summary["totals"][k] for k in ("rows", "rejected", "tokens")} == {
        k: clean["totals"][k] for k in ("rows", "rejected", "tokens")}
    watch.check(cluster)
    with capsys.disabled():
        print(f"\nembed: fault-free run {clean_s:.1f}s; worker node killed with {at_kill}/6 items committed, dead in "
              f"the GCS after {dead_s:.1f}s; the same run finished {after_kill_s:.1f}s after the kill "
              f"({summary['orphans_removed_at_end']} orphan piece(s) removed); {watch.samples} socket samples of "
              f"{len(watch.processes)} processes, all on {LOOPBACK}")


# --- rerank: the worker node dies in the rank phase ------------------------------------------------------------


@pytest.fixture
def rerank_job(tmp_path, tiny_reranker_model):
    """8 queries × 9 candidates over 3 files (6 work items of 12 pairs), some pairs twice (duplicate_pair
    rejects), ranked in 4 buckets."""
    corpus = tmp_path / "pairs"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = "ray reranks candidate documents for each query with a small random qwen model".split()
    pairs = set()
    for shard in range(3):
        rows = [(f"q{q}", f"d{d}") for q in range(8) for d in rng.choice(20, size=3, replace=False)]
        pairs.update(rows)
        pq.write_table(pa.table({"query_id": [q for q, _ in rows], "query": [f"query {q}" for q, _ in rows],
                                 "doc_id": [d for _, d in rows],
                                 "text": [" ".join(rng.choice(words, size=8)) for _ in rows]}),
                       corpus / f"part-{shard}.parquet", row_group_size=12)

    def config(name: str) -> pathlib.Path:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"input: {{paths: ['{corpus}/*.parquet'], rows_per_item: 12}}\n"
                       f"model: {{path: '{tiny_reranker_model}', max_length: 96}}\n"
                       f"output: {{path: '{tmp_path / name}', rank_buckets: 4}}\ncompute: {COMPUTE % 12}\n"
                       "run: {progress_interval_s: 0.5}\n")
        return cfg

    return config, pairs


def test_a_rerank_job_survives_losing_its_worker_node_mid_rank_phase(cluster, worker, rerank_job, tmp_path,
                                                                     capsys):
    config, pairs = rerank_job
    started = time.monotonic()
    clean = run_clean("rerank", config("clean"), cluster, "clean")
    clean_s = time.monotonic() - started

    out = tmp_path / "out"
    job = Job("rerank", config("out"), cluster, "out", failpoint="rank_bucket:hang")
    watch = SocketWatch(cluster, job.proc.pid)
    watch.start()
    try:
        wait_until(job, lambda: job.fired() and count(out / RANK_COMMITS_DIR) >= 1, "hung rank task after a rank "
                   "commit")
        scored = {p.name: p.read_bytes() for p in (out / COMMITS_DIR).glob("*.json")}
        ranked = {p.name: p.read_bytes() for p in (out / RANK_COMMITS_DIR).glob("*.json")}
        finished_early = (out / "_SUCCESS").exists()
        killed = time.monotonic()
        replacement, dead_s = lose_node(cluster, worker, job)
        code, summary, err = job.finish()
        after_kill_s = time.monotonic() - killed
    finally:
        watch.stop()
        if job.proc.poll() is None:
            job.proc.kill()

    assert len(scored) == 6 and 1 <= len(ranked) < 4 and not finished_early, \
        f"the kill did not land mid rank phase: {len(scored)}/6 items scored, {len(ranked)}/4 buckets ranked"
    assert code == 0, f"the run that lost its worker node did not finish by itself (exit {code}):\n{err[-3000:]}"
    assert summary["items_processed"] == summary["items_total"] == 6 and summary["items_skipped"] == 0
    assert cluster.node_alive(replacement)
    # phase 1's commits and the buckets ranked before the kill stand as they were
    assert {p.name: p.read_bytes() for p in (out / COMMITS_DIR).glob("*.json")} == scored
    assert all((out / RANK_COMMITS_DIR / name).read_bytes() == record for name, record in ranked.items())
    assert count(out / RANK_COMMITS_DIR) == count(tmp_path / "clean" / RANK_COMMITS_DIR) == 4

    report = verify_output(str(out))
    assert report.ok and report.counts["orphans"] == 0, report.problems
    ranked_rows = read_committed(str(out))
    got = list(zip(ranked_rows.column("query_id").to_pylist(), ranked_rows.column("doc_id").to_pylist()))
    assert len(got) == len(set(got)) and set(got) == pairs  # every pair once; its repeats are the rejects
    repeats = read_committed(str(out), rejects=True)
    assert len(got) + repeats.num_rows == 72 and set(repeats.column("reason").to_pylist()) == {"duplicate_pair"}
    assert sorted_rows(read_committed(str(out)), "query_id", "doc_id") == sorted_rows(
        read_committed(str(tmp_path / "clean")), "query_id", "doc_id")
    assert sorted_rows(read_committed(str(out), rejects=True), "item", "row") == sorted_rows(
        read_committed(str(tmp_path / "clean"), rejects=True), "item", "row")
    assert summary["totals"] == {**clean["totals"], "wall_s": summary["totals"]["wall_s"]}
    watch.check(cluster)
    with capsys.disabled():
        print(f"\nrerank: fault-free run {clean_s:.1f}s; worker node killed in the rank phase with {len(ranked)}/4 "
              f"buckets committed, dead in the GCS after {dead_s:.1f}s; the same run finished {after_kill_s:.1f}s "
              f"after the kill ({summary['orphans_removed_at_end']} orphan piece(s) removed); {watch.samples} "
              f"socket samples of {len(watch.processes)} processes, all on {LOOPBACK}")
