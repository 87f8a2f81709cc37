"""GPU replica pools on a cluster whose autoscaler adds nodes from zero: the pool reaches `max_replicas` as nodes
arrive, the nodes go when the job is done, and a node the autoscaler terminates mid-job (as a cloud reclaims a spot
instance) is replaced and the job finishes exactly once.

One cluster for the module (`support.autoscaling_cluster`): Ray's own autoscaler with its fake multi-node provider,
every node a local process on 127.0.0.1; the head has 1 CPU and no GPU, node type `gpu_worker` (1 CPU, 1 GPU) min 0
max 2. A fake GPU node is only a process that declares a GPU, so the replicas' calls are made slow by a failpoint
(`replica_batch:delay=S`, in the job's runtime_env: every Ray worker of the job gets it) and mostly sleep: how many
replicas are busy at once is read from the commit times, which a loaded 2-core machine stretches only by the small
CPU work around each sleep. Each item is one replica call (`rows_per_item` = `batch_rows`).
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.autoscaling_cluster import GPU_NODE_TYPE, AutoscalingCluster
from support.sockets import session_pids
from support.jobs import JOB_CONFIG_VAR, job_summary, wait_or_kill
from support.loopback_cluster import environ

from pipelines.output.reader import read_committed
from pipelines.output.root import COMMITS_DIR
from pipelines.output.verify import verify_output

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = pathlib.Path(__file__).resolve().parents[2]
ROWS_PER_ITEM = 10
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster():
    nodes = AutoscalingCluster(head_cpus=1, gpu_nodes_max=2, idle_timeout_s=15)
    try:
        nodes.wait_ready()
        yield nodes
    finally:
        nodes.stop()


def raylets(cluster: AutoscalingCluster) -> dict[int, str]:
    """The worker nodes' raylets (pid → the provider's node id): the provider starts each node from the head's
    monitor process, so a worker node's raylet is a child of the monitor (the head's raylet is a child of `ray
    start`), with the node id it chose in its environment."""
    out = {}
    for pid in session_pids(cluster.proc.pid):
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            parent_cmd = pathlib.Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if cmd[0].endswith(b"/raylet") and b"monitor.py" in parent_cmd:
            ids = [v for v in cmd + environ(pid).split(b"\0")
                   if v.startswith((b"--node_id=", b"RAY_OVERRIDE_NODE_ID_FOR_TESTING="))]
            out[pid] = ids[0].split(b"=", 1)[1].decode() if ids else "?"
    return out


def write_corpus(root: pathlib.Path, items: int) -> set[str]:
    root.mkdir()
    ids = set()
    for shard in range(items // 4):
        doc_ids = [f"s{shard}-{i}" for i in range(4 * ROWS_PER_ITEM)]
        ids.update(doc_ids)
        pq.write_table(pa.table({"doc_id": doc_ids, "text": [f"document {d} lorem ipsum" for d in doc_ids]}),
                       root / f"part-{shard}.parquet", row_group_size=ROWS_PER_ITEM)
    return ids


class Job:
    """`embedrank embed cfg --json` as its own process joining `cluster` (token auth on), its replica calls slowed
    by `delay_s` (a failpoint in the job's runtime_env)."""

    def __init__(self, cluster: AutoscalingCluster, folder: pathlib.Path, model: pathlib.Path, items: int,
                 delay_s: float):
        self.ids = write_corpus(folder / "corpus", items)
        self.out = folder / "out"
        cfg = folder / "job.yaml"
        cfg.write_text(f"input: {{paths: ['{folder}/corpus/*.parquet'], id_column: doc_id, "
                       f"rows_per_item: {ROWS_PER_ITEM}}}\n"
                       f"model: {{path: '{model}', max_length: 16}}\n"
                       f"output: {{path: '{self.out}'}}\n"
                       f"compute: {{num_gpus: 1, min_replicas: 1, max_replicas: 2, batch_rows: {ROWS_PER_ITEM}}}\n"
                       "run: {progress_interval_s: 2}\n")
        env = {k: v for k, v in cluster.client_env().items() if not k.startswith("EMBEDRANK_")}
        env[JOB_CONFIG_VAR] = json.dumps({"runtime_env": {"env_vars": {
            "EMBEDRANK_FAILPOINTS": f"replica_batch:delay={delay_s:g}"}}})
        self.delay_s = delay_s
        self.started = time.time()
        self.stdout, self.stderr = open(folder / "job.out", "w+"), open(folder / "job.err", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "embed", str(cfg), "--json", "--set",
                                      f"run.ray_address={cluster.address}"], cwd=REPO, env=env,
                                     stdout=self.stdout, stderr=self.stderr, text=True)

    def commits(self) -> list[float]:
        """Commit times (seconds since the job started), sorted."""
        folder = self.out / COMMITS_DIR
        return sorted(p.stat().st_mtime - self.started for p in folder.glob("*.json")) if folder.exists() else []

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def finish(self) -> tuple[int, dict | None, str]:
        code = wait_or_kill(self.proc, JOB_TIMEOUT_S)
        self.stdout.seek(0)
        return code, job_summary(code, self.stdout.read()), self.log()


def busy_at_once(commits: list[float], delay_s: float) -> float:
    """Replicas busy at once over the job's replica work: the calls' total sleep over the span from the first
    call's start (its commit less one call) to the last commit."""
    return len(commits) * delay_s / (commits[-1] - commits[0] + delay_s)


def exactly_once(out: pathlib.Path, ids: set[str]) -> None:
    report = verify_output(str(out))
    assert report.ok and report.counts["orphans"] == 0, report.problems
    got = read_committed(str(out)).column("id").to_pylist()
    assert len(got) == len(set(got)) and set(got) == ids


def wait_for(condition, what: str, timeout_s: float, cluster: AutoscalingCluster) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"no {what} after {timeout_s}s:\n{cluster.status()}"
        time.sleep(1)
    return time.monotonic() - started


def test_the_pool_grows_from_zero_nodes_to_max_replicas_and_the_nodes_go_after(cluster, tiny_embedding_model,
                                                                               tmp_path, capsys):
    assert not raylets(cluster), "a GPU node before any job asked for one"
    job = Job(cluster, tmp_path, tiny_embedding_model, items=24, delay_s=4)
    code, summary, err = job.finish()
    assert code == 0, err[-4000:]
    exactly_once(job.out, job.ids)
    commits = job.commits()
    busy = busy_at_once(commits, job.delay_s)
    pool = summary["pool"]
    progress = [ln for ln in err.splitlines() if ln.startswith("[embed]")]
    with capsys.disabled():
        print(f"\nfrom zero GPU nodes: {len(commits)} commits at {[round(t, 1) for t in commits]} s: {busy:.2f} "
              f"replicas busy at once; pool {pool}")
    assert summary["items_processed"] == 24 and len(commits) == 24
    assert busy >= 1.4, f"{busy:.2f} replicas busy at once of 2: {commits}\n{err[-3000:]}"
    assert pool["max_replicas"] == 2 and pool["peak_running"] == 2, pool
    assert "the model pool asks for 2 replica(s) at once" in err
    assert any("wanted / 2 max" in ln for ln in progress), progress
    waiting = [ln for ln in err.splitlines() if ln.startswith("waiting for the cluster")]
    assert any("autoscaler launching gpu_worker × 2" in ln for ln in waiting), waiting
    assert "replicas: up to 2 of max 2 running; below max_replicas for" in err
    # the queue is drained: the replicas exited with the job and the autoscaler removes both nodes (idle 15 s)
    gone_s = wait_for(lambda: not raylets(cluster), "scale-down to zero GPU nodes", 120, cluster)
    with capsys.disabled():
        print(f"both GPU nodes removed {gone_s:.0f}s after the job ended")
    assert "(idle)" in cluster.monitor_log()


def test_a_gpu_node_the_autoscaler_terminates_mid_job_is_replaced_and_the_job_finishes(cluster,
                                                                                       tiny_embedding_model,
                                                                                       tmp_path, capsys):
    wait_for(lambda: not raylets(cluster), "scale-down to zero GPU nodes before the job", 120, cluster)
    job = Job(cluster, tmp_path, tiny_embedding_model, items=16, delay_s=5)
    joined: set[str] = set()
    try:
        wait_for(lambda: len(job.commits()) >= 2 and len(raylets(cluster)) == 2 or job.proc.poll() is not None,
                 "two GPU nodes and two commits", 300, cluster)
        assert job.proc.poll() is None, job.log()[-3000:]
        before = set(raylets(cluster).values())
        at_loss = len(job.commits())
        # the autoscaler takes a node away mid-job (as a cloud reclaims a spot instance): its max lowered to 1 ...
        cluster.set_gpu_nodes_max(1)
        wait_for(lambda: len(raylets(cluster)) == 1, "a GPU node terminated by the autoscaler", 60, cluster)
        lost = before - set(raylets(cluster).values())
        launched = launches(cluster.monitor_log())
        # ... and back to 2: the restarting replica's demand is what it launches a replacement for
        cluster.set_gpu_nodes_max(2)
        while job.proc.poll() is None:
            joined |= set(raylets(cluster).values()) - before
            time.sleep(0.5)
        code, summary, err = job.finish()
    finally:
        cluster.set_gpu_nodes_max(2)
        if job.proc.poll() is None:
            job.proc.kill()
    log = cluster.monitor_log()
    with capsys.disabled():
        print(f"\nnode …{next(iter(lost))[-5:]} terminated by the autoscaler with {at_loss}/16 items committed; "
              f"replacement joined while the job ran: {sorted(n[-5:] for n in joined) or 'no'}; job exit {code}; "
              f"the autoscaler:\n{events(log)}")
    assert at_loss <= 6, "the node was taken after most of the job's work was done"
    assert len(lost) == 1 and f"Terminating the node with id {next(iter(lost))}" in log, log[-3000:]
    assert "max_workers_per_type" in log
    assert code == 0, err[-4000:]
    assert summary["items_processed"] == 16
    exactly_once(job.out, job.ids)
    assert launches(log) > launched, f"no replacement node was launched:\n{events(log)}"


def launches(monitor_log: str) -> int:
    """GPU nodes the autoscaler has launched so far, from its log."""
    return sum(int(n) for n in re.findall(rf"Launching (\d+) nodes, type {GPU_NODE_TYPE}", monitor_log))


def events(monitor_log: str) -> str:
    """The autoscaler's launches and terminations, from its log."""
    wanted = re.compile(r"Launching \d+ nodes|Terminating the node")
    return "\n".join(ln for ln in monitor_log.splitlines() if wanted.search(ln))
