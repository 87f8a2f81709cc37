"""Credentials never leak into outputs or messages, and wrong credentials fail fast and clearly."""

import io
import pathlib
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import InputError
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed

pytestmark = pytest.mark.integration
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


def test_secrets_appear_nowhere(ray_local, s3_bucket, s3_server, tiny_embedding_model, monkeypatch, capfd):
    import ray

    bucket, opts = s3_bucket
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_CANARY)
    fs = s3_server.filesystem()
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(50)] + [None]}), buf, row_group_size=20)
    fs.pipe(f"{bucket}/corpus/a.parquet", buf.getvalue())
    run_embed(job(bucket, opts, tiny_embedding_model))
    canaries = [opts["secret"].encode(), ENV_CANARY.encode()]

    captured = capfd.readouterr()
    for c in canaries:
        assert c.decode() not in captured.out + captured.err
    objects = fs.find(f"{bucket}/out")
    assert any(p.endswith("_job.json") for p in objects) and any("/_commits/" in p for p in objects)
    for path in objects:
        data = fs.cat(path)
        assert not any(c in data for c in canaries), path
    logs = pathlib.Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for log in logs.rglob("*"):
        if log.is_file():
            data = log.read_bytes()
            assert not any(c in data for c in canaries), log

    bad = dict(opts, secret="wrong-" + opts["secret"])
    box, _ = finishes_within(lambda: run_embed(job(bucket, bad, tiny_embedding_model, out="out2")), 120)
    assert isinstance(box.get("error"), InputError)
    assert all(c.decode() not in str(box["error"]) for c in canaries + [bad["secret"].encode()])


def test_wrong_credentials_fail_with_a_clear_message(s3_bucket, s3_server, tiny_embedding_model):
    bucket, opts = s3_bucket
    s3_server.filesystem().pipe(f"{bucket}/corpus/a.parquet", b"irrelevant")
    bad = dict(opts, secret="not-the-secret")
    box, elapsed = finishes_within(lambda: run_embed(job(bucket, bad, tiny_embedding_model)), 120)
    err = box.get("error")
    assert isinstance(err, InputError), err
    assert "access denied" in str(err) and f"s3://{bucket}/corpus/*.parquet" in str(err)
    print(f"wrong credentials failed after {elapsed:.1f}s: {err}")
