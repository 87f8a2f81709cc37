"""A store that refuses us (wrong secret, nothing listening at the endpoint) is one line naming the setting and
exit 2 for every command, never a botocore traceback."""

import socket

import pytest

from pipelines.cli import main

pytestmark = pytest.mark.integration


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options(values):
    return [a for k, v in values.items() for a in ("--storage-option", f"{k}={v}")]


@pytest.fixture
def bad_stores(s3_bucket):
    bucket, good = s3_bucket
    wrong_secret = {"endpoint_url": good["endpoint_url"], "key": good["key"], "secret": "not-the-secret"}
    dead = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": good["key"], "secret": good["secret"]}
    return bucket, {"wrong secret": (wrong_secret, "key and secret"),
                    "dead endpoint": (dead, f"cannot reach the endpoint {dead['endpoint_url']}; check "
                                            "storage_options endpoint_url")}


@pytest.mark.parametrize("case", ["wrong secret", "dead endpoint"])
@pytest.mark.parametrize("command", ["status", "verify"])
def test_output_commands(bad_stores, capsys, case, command):
    bucket, cases = bad_stores
    values, setting = cases[case]
    assert main([command, f"s3://{bucket}/out", *options(values)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("embedrank: error: S3") and setting in err, err


@pytest.mark.parametrize("case", ["wrong secret", "dead endpoint"])
def test_embed_dry_run(bad_stores, tmp_path, tiny_embedding_model, capsys, case):
    bucket, cases = bad_stores
    values, setting = cases[case]
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f'input: {{paths: ["s3://{bucket}/corpus/*.parquet"], storage_options: {dict(values)}}}\n'
                   f'model: {{path: "{tiny_embedding_model}"}}\noutput: {{path: "{tmp_path / "out"}"}}\n')
    assert main(["embed", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("embedrank: error")]
    assert len(lines) == 1 and setting in lines[0] and "Traceback" not in err, err
