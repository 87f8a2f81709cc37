"""On a cluster: the model pool autoscales within its bounds, and `ray job submit` runs a job end to end.

The autoscaling test runs the real embed job in-process on the session's local Ray
(2 CPUs), its replicas slowed by a `delay` failpoint, and watches the pool through
Ray's actor table. The job-submission test
starts a real head node (`ray start --head`, token auth on, everything on loopback,
its own temp dir), submits `embedrank embed` with `--working-dir .` exactly as the
README says, and stops only the processes of that head.
"""

from __future__ import annotations

import os
import pathlib
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.sockets import free_ports, session_pids, stop_session

from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import read_committed
from pipelines.output.verify import verify_output

REPO = pathlib.Path(__file__).resolve().parents[2]
POOL_CLASS = "MapWorker(MapBatches(EmbedReplica))"


def write_corpus(root: pathlib.Path, shards: int, rows: int, words: int) -> int:
    root.mkdir()
    for shard in range(shards):
        texts = [f"document {shard}-{i} " + "lorem ipsum dolor sit amet " * words for i in range(rows)]
        pq.write_table(pa.table({"doc_id": [f"s{shard}-{i}" for i in range(rows)], "text": texts}),
                       root / f"part-{shard}.parquet", row_group_size=20)
    return shards * rows


# --- the actor pool grows from min_replicas to max_replicas under load, never past it -------------------------


class PoolSampler(threading.Thread):
    """Samples (seconds, alive replicas, replicas in the pool: alive or starting) from Ray's actor table."""

    def __init__(self, period_s: float = 0.1):
        super().__init__(daemon=True)
        from ray._private.state import state

        self.state, self.period_s = state, period_s
        self.before = set(self._actors())  # earlier tests' pools in this session are not ours
        self.samples: list[tuple[float, int, int]] = []
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    def _actors(self) -> dict[str, str]:
        return {aid: a["State"] for aid, a in self.state.actor_table(None).items()
                if a["ActorClassName"] == POOL_CLASS}

    def run(self):
        while not self.stopped.is_set():
            ours = [s for aid, s in self._actors().items() if aid not in self.before]
            alive = sum(s == "ALIVE" for s in ours)
            self.samples.append((time.monotonic() - self.t0, alive, sum(s != "DEAD" for s in ours)))
            time.sleep(self.period_s)

    def stop(self):
        self.stopped.set()
        self.join(10)

    def changes(self) -> list[tuple[float, int, int]]:
        out: list[tuple[float, int, int]] = []
        for t, alive, pool in self.samples:
            if not out or (alive, pool) != out[-1][1:]:
                out.append((round(t, 1), alive, pool))
        return out


def test_a_delay_failpoint_sleeps_on_every_hit(monkeypatch):
    from common import failpoints

    monkeypatch.setenv("EMBEDRANK_FAILPOINTS", "replica_batch:delay=0.05")
    started = time.monotonic()
    for _ in range(3):
        failpoints.hit("replica_batch")
    assert time.monotonic() - started >= 0.15


@pytest.mark.integration
def test_the_model_pool_grows_to_max_replicas_under_load_and_never_past_it(ray_local, tiny_embedding_model,
                                                                           tmp_path, monkeypatch, capsys):
    # Load without CPU: every replica batch sleeps 1 s (failpoint `delay`), so work queues up at the pool while
    # the second replica still gets the CPU it needs to start. (A CPU-heavy model starves that start on 2 cores:
    # it then took 40 s and the job was nearly done before replica 2 came up.)
    from pipelines import graph

    model_pool = graph.model_pool
    monkeypatch.setattr(graph, "model_pool", lambda compute: {
        **model_pool(compute), "runtime_env": {"env_vars": {"EMBEDRANK_FAILPOINTS": "replica_batch:delay=1"}}})
    rows = write_corpus(tmp_path / "corpus", shards=4, rows=120, words=2)  # 24 items: 24 s on one replica
    cfg = EmbedJobConfig.model_validate({
        "input": {"paths": [f"{tmp_path}/corpus/*.parquet"], "id_column": "doc_id", "rows_per_item": 20},
        "model": {"path": str(tiny_embedding_model), "max_length": 32},
        "output": {"path": str(tmp_path / "out")},
        # two 0.5-CPU replicas and the 0.25-CPU read/write tasks fit in the session's 2 CPUs
        "compute": {"min_replicas": 1, "max_replicas": 2, "num_cpus": 0.5, "io_num_cpus": 0.25, "batch_rows": 20},
        "run": {"progress_interval_s": 5},
    })
    sampler = PoolSampler()
    sampler.start()
    try:
        summary = run_embed(cfg)
    finally:
        sampler.stop()
    changes = sampler.changes()
    with capsys.disabled():
        print(f"\nreplicas over time (s, alive, in pool incl. starting): {changes}; job {summary['wall_s']}s")
    assert summary["rows"] == rows and summary["items_processed"] == 24
    assert verify_output(str(tmp_path / "out")).ok
    alive = [a for _, a, _ in sampler.samples]
    pool = [p for _, _, p in sampler.samples]
    assert max(pool) <= 2, changes
    assert max(alive) == 2, f"the pool never ran 2 replicas: {changes}"
    assert alive.index(1) < alive.index(2), f"the pool did not start at min_replicas=1 and grow: {changes}"
    # the job's own report of its pool (progress line, summary) agrees with the actor table's
    assert summary["pool"]["max_replicas"] == 2 and summary["pool"]["peak_running"] == 2, summary["pool"]


# --- `ray job submit` against a real head node -----------------------------------------------------------------


class LocalHead:
    """`ray start --head --block` in a session of its own; stopping it signals that session only."""

    def __init__(self, env: dict[str, str], temp_dir: str):
        gcs, self.dashboard_port, client, agent, metrics, runtime_env = free_ports(6)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = open(os.path.join(temp_dir, "head.log"), "w+")
        self.proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
             f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={runtime_env}", "--num-cpus=2", f"--temp-dir={temp_dir}",
             "--disable-usage-stats"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str, token: str | None) -> int:
        request = urllib.request.Request(self.address + path,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def wait_ready(self, token: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                if self.get("/api/jobs/", token) == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the head's job server did not answer in {timeout_s}s\n{self.tail()}")

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        stop_session(self.proc)
        self.log.close()


@pytest.mark.integration
@pytest.mark.slow
def test_ray_job_submit_runs_an_embed_job_on_a_token_authenticated_head(tmp_path, tiny_embedding_model):
    rows = write_corpus(tmp_path / "corpus", shards=2, rows=40, words=2)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{paths: [\"{tmp_path}/corpus/*.parquet\"], id_column: doc_id, rows_per_item: 20}}\n"
                      f"model: {{path: \"{tiny_embedding_model}\", max_length: 32}}\n"
                      f"output: {{path: \"{out}\"}}\n"
                      "run: {progress_interval_s: 2}\n")
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "EMBEDRANK_"))}
    # as a user's shell would have it: the venv active, token auth on, the token in the environment
    # (never in ~/.ray/auth_token here); the head, its workers and the CLI all read the same variables.
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    temp_dir = tempfile.mkdtemp(prefix="er-ray-", dir="/tmp")  # short: Ray's unix socket paths must fit
    started = time.monotonic()
    head = LocalHead(env, temp_dir)
    try:
        head.wait_ready(token)
        assert head.get("/api/jobs/", None) == 401 and head.get("/api/jobs/", "wrong-" + token) == 403
        ready_s = time.monotonic() - started
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", head.address, "--working-dir", ".", "--",
             "embedrank", "embed", str(config)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        job_id = re.search(r"raysubmit_\w+", log).group(0)
        status = subprocess.run(["ray", "job", "status", "--address", head.address, job_id],
                                env=env, capture_output=True, text=True, timeout=60)
        assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"head ready in {ready_s:.1f}s, job + teardown in {time.monotonic() - started - ready_s:.1f}s")
    assert not session_pids(head.proc.pid)
    report = verify_output(str(out))
    assert report.ok, report.problems
    assert read_committed(str(out)).num_rows == rows
