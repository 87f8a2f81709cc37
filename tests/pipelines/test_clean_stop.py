"""SIGTERM on a running `embedrank embed` with its own local Ray: the job stops within seconds with exit 143,
says how far it got, leaves every committed item whole and no process of its Ray behind, and a rerun resumes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import job_process_env
from support.sockets import descendant_pids, start_time

from pipelines.output.root import COMMITS_DIR
from pipelines.output.verify import verify_output

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = pathlib.Path(__file__).resolve().parents[2]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def session_processes(session_dir: str) -> list[int]:
    """Live processes whose command line names the job's Ray session directory (GCS, raylet, monitors)."""
    return [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
            if session_dir in cmdline(int(p)) and start_time(int(p))]


@pytest.fixture
def slow_job(tmp_path, tiny_embedding_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for shard in range(4):
        pq.write_table(pa.table({"doc_id": [f"s{shard}-{i}" for i in range(40)],
                                 "text": [f"document {shard} {i} " + "word " * (i % 9) for i in range(40)]}),
                       corpus / f"part-{shard}.parquet", row_group_size=20)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {{paths: ['{corpus}/*.parquet'], id_column: doc_id, rows_per_item: 20}}\n"
                   f"model: {{path: '{tiny_embedding_model}', max_length: 32}}\n"
                   f"output: {{path: '{tmp_path / 'out'}'}}\ncompute: {{batch_rows: 10}}\n"
                   "run: {progress_interval_s: 0.5}\n")
    return cfg, tmp_path / "out"


def test_sigterm_stops_the_job_cleanly_and_a_rerun_resumes(slow_job, session_ray):
    cfg, out = slow_job
    # its own local Ray (no address), replicas slowed to 1 s a batch of 10 rows: 8 items take well over 15 s
    env = {**job_process_env(driver_env={"EMBEDRANK_FAILPOINTS": "replica_batch:delay=1"}), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "embed", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not list((out / COMMITS_DIR).glob("*.json")):
            time.sleep(0.1)
        assert proc.poll() is None, f"the job ended before it could be stopped: {''.join(err)}"
        logs = [line for line in err if line.startswith("ray: started a local Ray (its logs: ")]
        assert logs, err
        session_dir = logs[0].split("its logs: ", 1)[1].split(";")[0].strip().removesuffix("/logs")
        ray_processes = {pid: start_time(pid) for pid in descendant_pids(proc.pid) if pid != proc.pid}
        ray_processes.update({pid: start_time(pid) for pid in session_processes(session_dir)})
        assert len(ray_processes) >= 4, ray_processes  # GCS, raylet, workers, …

        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    stderr = "".join(err)
    stopped = [line for line in err if line.startswith("embedrank: stopped by SIGTERM after ")]
    assert len(stopped) == 1 and stopped[0].rstrip().endswith("rerun the same command to resume"), stderr
    assert "Traceback" not in stderr and "core_worker.cc" not in stderr and "Loading weights" not in stderr, stderr
    print(f"\nstopped in {took:.1f}s: {stopped[0].strip()}")

    # what `auto` chose (on 2 cores: one replica of 1 CPU) was printed at start and recorded in numbers
    assert any(line.startswith("compute: ") and "auto: min_replicas, max_replicas, num_cpus" in line
               for line in err), stderr
    compute = json.loads((out / "_job.json").read_text())["config"]["compute"]
    assert compute["max_replicas"] == compute["min_replicas"] >= 1 and compute["num_cpus"] > 0

    report = verify_output(str(out))
    committed = len(list((out / COMMITS_DIR).glob("*.json")))
    assert 1 <= committed < 8
    assert report.problems and all(p.endswith("is not committed") for p in report.problems), report.problems
    assert f"after {committed} of 8 work item(s)" in stopped[0]

    deadline = time.monotonic() + 15
    left = {}
    while time.monotonic() < deadline:
        left = {pid: cmdline(pid) for pid, started in ray_processes.items() if started and start_time(pid) == started}
        left.update({pid: cmdline(pid) for pid in session_processes(session_dir)})
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"processes of the job's Ray outlived it: {left}"

    rerun = subprocess.run([sys.executable, "-m", "pipelines.cli", "embed", str(cfg), "--set",
                            f"run.ray_address={session_ray}"], cwd=REPO, env=job_process_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - committed} item(s) processed, {committed} skipped" in rerun.stderr
    assert verify_output(str(out)).ok
