"""Crashes at each commit step and a killed driver lose nothing and duplicate nothing.

Each job runs as its own process, as a user runs it, joining the session's Ray as a driver
joins a cluster; a failpoint that must fire in Ray's workers reaches them through the job's
runtime_env (`support.jobs`). A crash is a failpoint (`common/failpoints.py`) or a SIGKILL
from outside.
"""

import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import job_process_env, job_summary

from pipelines.output.reader import read_committed
from pipelines.output.status import format_status, job_status
from pipelines.output.verify import verify_output

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = """
input: {{paths: ["{corpus}/*.parquet"], id_column: doc_id, rows_per_item: 20}}
model: {{path: "{model}", max_length: 32}}
output: {{path: "{out}"}}
compute: {{batch_rows: 20}}
run: {{progress_interval_s: 0.5}}
"""


@pytest.fixture
def job(tmp_path, tiny_embedding_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    ids = []
    for shard in range(4):
        texts = [f"document {shard}-{i} " + "word " * (i % 17) for i in range(60)]
        texts[7] = None
        doc_ids = [f"s{shard}-{i}" for i in range(60)]
        ids += doc_ids
        pq.write_table(pa.table({"doc_id": doc_ids, "text": pa.array(texts, pa.string())}),
                       corpus / f"part-{shard}.parquet", row_group_size=20)
    cfg = tmp_path / "job.yaml"
    out = tmp_path / "out"
    cfg.write_text(CONFIG.format(corpus=corpus, model=tiny_embedding_model, out=out))
    return cfg, out, set(ids)


def start(cfg, ray_address, marker_dir=None, failpoints=None, in_workers=False):
    """The job as a process joining the session's Ray at `ray_address`, as a driver joins a cluster.
    Failpoints fire in the driver; with `in_workers`, in the job's Ray workers too (its runtime_env)."""
    points = {"EMBEDRANK_FAILPOINTS": failpoints, "EMBEDRANK_FAILPOINT_DIR": str(marker_dir)} if failpoints else {}
    env = job_process_env(worker_env=points) if in_workers else job_process_env(driver_env=points)
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "embed", str(cfg), "--json",
                             "--set", f"run.ray_address={ray_address}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc):
    """Exit code, the `--json` summary line (Ray may print its own lines around it), stderr."""
    out, err = proc.communicate(timeout=300)
    return proc.returncode, job_summary(proc.returncode, out), err


def assert_exactly_once(out, input_ids):
    report = verify_output(str(out))
    assert report.ok, report.problems
    got = read_committed(str(out)).column("id").to_pylist()
    rejected = read_committed(str(out), rejects=True).column("id").to_pylist()
    assert len(got) == len(set(got)) and not set(got) & set(rejected)
    assert set(got) | set(rejected) == input_ids and len(got) + len(rejected) == len(input_ids)
    assert report.counts["orphans"] == 0


def test_write_task_crashes_are_retried_without_duplicates(job, tmp_path, session_ray):
    """Ray retries a write task whose worker died (Ray Data's tasks retry system failures), inside the one run:
    no rerun. Each failpoint kills its worker once (the marker file, made just before the kill, proves it fired);
    the first and only run must still finish, every item committed once, `_SUCCESS` written."""
    cfg, out, ids = job
    markers = tmp_path / "markers"
    markers.mkdir()
    code, summary, err = finish(start(cfg, session_ray, markers, "before_piece_write,after_piece_write",
                                      in_workers=True))
    assert (markers / "before_piece_write").exists() and (markers / "after_piece_write").exists()
    assert code == 0, f"the run with crashed write tasks did not finish by itself (exit {code}):\n{err[-3000:]}"
    assert summary["items_processed"] == summary["items_total"] == 12 and summary["items_skipped"] == 0
    assert committed(out) == 12 and (out / "_SUCCESS").exists()
    assert_exactly_once(out, ids)


def committed(out):
    return len(list((out / "_commits").glob("*.json"))) if (out / "_commits").exists() else 0


def test_driver_crashes_around_a_commit_resume_exactly_once(job, tmp_path, session_ray):
    cfg, out, ids = job
    for point in ("before_commit_write", "after_commit_write"):
        before = committed(out)
        code, _, _ = finish(start(cfg, session_ray, tmp_path, point))
        assert code == 137 and (tmp_path / point).exists()
        assert committed(out) == before + (point == "after_commit_write")
    before = committed(out)
    code, summary, err = finish(start(cfg, session_ray))
    assert code == 0, err
    assert summary["items_skipped"] == before and summary["items_processed"] == summary["items_total"] - before
    assert_exactly_once(out, ids)


def test_a_driver_killed_half_way_resumes_and_recomputes_only_unfinished_items(job, capsys, session_ray):
    cfg, out, ids = job
    proc = start(cfg, session_ray)
    commits = out / "_commits"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if commits.exists() and len(list(commits.glob("*.json"))) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed half way"
    running = job_status(str(out))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = committed(out)
    assert running["state"].startswith("running on") and running["items_total"] == 12
    assert 6 <= running["items_committed"] <= done and running["rows_per_s"] > 0
    stopped = job_status(str(out))
    assert stopped["state"].startswith("stopped (its driver") and stopped["items_committed"] == done
    in_flight_rows = 20 * (12 - done)
    code, summary, err = finish(start(cfg, session_ray))
    assert code == 0, err
    recomputed_rows = summary["rows"] + summary["rejected"]
    assert summary["items_processed"] == 12 - done
    assert recomputed_rows <= in_flight_rows
    assert_exactly_once(out, ids)
    final = job_status(str(out))
    assert final["state"] == "finished" and final["items_committed"] == 12
    assert final["rows"] + final["rejected"] == len(ids) and "items 12/12 (100%)" in format_status(final)
    with capsys.disabled():
        print(f"\ndriver killed with {done}/12 items committed: rerun recomputed {recomputed_rows} rows "
              f"of {in_flight_rows} not committed at the kill")
