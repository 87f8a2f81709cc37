"""Credentials never leak into outputs or messages, and wrong credentials fail fast and clearly."""

import io
import json
import pathlib
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import job_process_env
from support.sockets import descendant_pids

from common.errors import InputError
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed

pytestmark = pytest.mark.integration
REPO = pathlib.Path(__file__).resolve().parents[2]
ENV_CANARY = "env-canary-7f3a91d2c4"


def job(bucket, opts, model, out="out"):
    return EmbedJobConfig.model_validate({
        "input": {"paths": [f"s3://{bucket}/corpus/*.parquet"], "storage_options": opts, "rows_per_item": 20},
        "model": {"path": str(model), "max_length": 32},
        "output": {"path": f"s3://{bucket}/{out}"},
        "run": {"progress_interval_s": 0.2},
    })


def finishes_within(fn, seconds):
    """Run fn in a thread; a hang-guard (not a timing claim): fail instead of hanging the suite."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds}s"
    return box, time.monotonic() - started


def worker_environments(root_pid: int) -> dict[int, bytes]:
    """The environment blocks of `root_pid`'s live Ray worker processes (its own Ray's raylet starts them); not
    Ray's agents, which run no job code and whose /proc environ does not show their start environment."""
    found = {}
    for pid in descendant_pids(root_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        if b"default_worker.py" in cmd or (cmd.startswith(b"ray::") and not cmd.rstrip(b"\0").endswith(b"Agent")):
            found[pid] = env
    return found


def run_cli(cfg, env, watch=None):
    """`embedrank embed cfg --json` as its own process; `watch(proc)` is called while it runs."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "embed", str(cfg), "--json"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    box: dict = {}
    reader = threading.Thread(target=lambda: box.update(zip(("out", "err"), proc.communicate(timeout=300))),
                              daemon=True)
    reader.start()
    while watch is not None and proc.poll() is None:
        watch(proc)
        time.sleep(0.2)
    reader.join(timeout=310)
    return proc.returncode, box["out"], box["err"]


@pytest.mark.slow
def test_secrets_appear_nowhere(s3_bucket, s3_server, tiny_embedding_model, tmp_path):
    """The job runs as its own process with its own Ray, the canary in its environment from the start: the Ray it
    starts and every worker inherit it (checked in /proc), and neither the canary nor the S3 secret of the config
    shows in stdout/stderr, any object of the output (`_job.json`, commits, pieces), any log file of that Ray, or
    the error of a run with a wrong secret."""
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(50)] + [None]}), buf, row_group_size=20)
    fs.pipe(f"{bucket}/corpus/a.parquet", buf.getvalue())
    env = {**job_process_env(), "RAY_AUTH_MODE": "disabled", "AWS_SECRET_ACCESS_KEY": ENV_CANARY}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps(job(bucket, opts, tiny_embedding_model).model_dump(mode="json", exclude_unset=True)))
    workers: dict[int, bytes] = {}
    code, out, err = run_cli(cfg, env, watch=lambda proc: workers.update(worker_environments(proc.pid)))
    assert code == 0, err
    assert workers, "saw no Ray worker of the job's own Ray while it ran"
    assert all(f"AWS_SECRET_ACCESS_KEY={ENV_CANARY}".encode() in e for e in workers.values())  # inherited
    canaries = [opts["secret"].encode(), ENV_CANARY.encode()]
    assert json.loads([ln for ln in out.splitlines() if ln.startswith('{"')][-1])["rows"] == 50
    for c in canaries:
        assert c.decode() not in out + err
    objects = fs.find(f"{bucket}/out")
    assert any(p.endswith("_job.json") for p in objects) and any("/_commits/" in p for p in objects)
    for path in objects:
        data = fs.cat(path)
        assert not any(c in data for c in canaries), path
    started = [ln for ln in err.splitlines() if ln.startswith("ray: started a local Ray (its logs: ")]
    assert len(started) == 1, err
    logs = pathlib.Path(started[0].split("its logs: ", 1)[1].split(";")[0].strip().rstrip(")"))
    assert logs.is_dir() and any(p.is_file() for p in logs.rglob("*")), logs
    for log in logs.rglob("*"):
        if log.is_file():
            data = log.read_bytes()
            assert not any(c in data for c in canaries), log

    bad = dict(opts, secret="wrong-" + opts["secret"])
    cfg.write_text(json.dumps(job(bucket, bad, tiny_embedding_model, out="out2").model_dump(mode="json",
                                                                                          exclude_unset=True)))
    code, out, err = run_cli(cfg, env)
    assert code != 0 and "access denied" in err, err
    assert all(c.decode() not in out + err for c in canaries + [bad["secret"].encode()])


def test_wrong_credentials_fail_with_a_clear_message(s3_bucket, s3_server, tiny_embedding_model):
    bucket, opts = s3_bucket
    s3_server.filesystem().pipe(f"{bucket}/corpus/a.parquet", b"irrelevant")
    bad = dict(opts, secret="not-the-secret")
    box, elapsed = finishes_within(lambda: run_embed(job(bucket, bad, tiny_embedding_model)), 120)
    err = box.get("error")
    assert isinstance(err, InputError), err
    assert "access denied" in str(err) and f"s3://{bucket}/corpus/*.parquet" in str(err)
    print(f"wrong credentials failed after {elapsed:.1f}s: {err}")
