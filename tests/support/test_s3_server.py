"""Integration tests for the SeaweedFS-backed S3 test server."""

import ipaddress
import os
import re
import shutil
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from botocore.exceptions import ClientError

from support.s3_server import S3Server, S3ServerError

# Tests that use the server are marked `integration` by conftest (their fixtures); the rest are unit tests.


def _fs(storage_options):
    return s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)


def _status_and_code(exc):
    """HTTP status and S3 error code of the ClientError behind an s3fs error.

    HEAD responses carry no body, so their code is just "403"; GET/LIST
    responses name the S3 error.
    """
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, ClientError):
        cause = cause.__cause__
    assert isinstance(cause, ClientError), f"no botocore ClientError behind {exc!r}"
    return (
        cause.response["ResponseMetadata"]["HTTPStatusCode"],
        cause.response["Error"]["Code"],
    )


def test_parquet_roundtrip(s3_bucket):
    bucket, options = s3_bucket
    fs = _fs(options)
    table = pa.table(
        {
            "id": pa.array(range(1000), pa.int64()),
            "text": [f"doc {i}" for i in range(1000)],
            "score": pa.array([i / 7 for i in range(1000)], pa.float32()),
        }
    )
    path = f"{bucket}/x/a.parquet"

    pq.write_table(table, path, filesystem=fs)
    back = pq.read_table(f"s3://{path}", filesystem=_fs(options))

    assert back.equals(table)


def test_glob_lists_written_file(s3_bucket):
    bucket, options = s3_bucket
    fs = _fs(options)
    pq.write_table(pa.table({"a": [1, 2, 3]}), f"{bucket}/x/a.parquet", filesystem=fs)
    fs.pipe(f"{bucket}/x/notes.txt", b"not parquet")

    assert _fs(options).glob(f"s3://{bucket}/x/*.parquet") == [f"{bucket}/x/a.parquet"]


def test_wrong_secret_is_denied_quickly(s3_bucket):
    bucket, options = s3_bucket
    fs = _fs(options)
    fs.pipe(f"{bucket}/secret.txt", b"payload")
    bad = _fs({**options, "secret": options["secret"] + "-wrong"})

    started = time.monotonic()
    with pytest.raises(PermissionError) as excinfo:
        bad.cat(f"{bucket}/secret.txt")
    elapsed = time.monotonic() - started

    assert _status_and_code(excinfo.value)[0] == 403
    assert elapsed < 5, f"denial took {elapsed:.1f}s"
    with pytest.raises(PermissionError) as excinfo:
        bad.call_s3("get_object", Bucket=bucket, Key="secret.txt")
    assert _status_and_code(excinfo.value) == (403, "SignatureDoesNotMatch")
    with pytest.raises(PermissionError):
        bad.pipe(f"{bucket}/intruder.txt", b"x")
    assert not fs.exists(f"{bucket}/intruder.txt")


def test_unknown_key_and_anonymous_are_denied(s3_bucket):
    bucket, options = s3_bucket
    _fs(options).pipe(f"{bucket}/secret.txt", b"payload")

    unknown = _fs({**options, "key": "nobody", "secret": "nothing"})
    with pytest.raises(PermissionError) as excinfo:
        unknown.call_s3("get_object", Bucket=bucket, Key="secret.txt")
    assert _status_and_code(excinfo.value) == (403, "InvalidAccessKeyId")

    anonymous = s3fs.S3FileSystem(
        anon=True,
        skip_instance_cache=True,
        endpoint_url=options["endpoint_url"],
        client_kwargs=options["client_kwargs"],
    )
    with pytest.raises(PermissionError):
        anonymous.cat(f"{bucket}/secret.txt")
    with pytest.raises(PermissionError):
        anonymous.pipe(f"{bucket}/intruder.txt", b"x")


def test_missing_bucket_is_not_auto_created(s3_server):
    fs = s3_server.filesystem()
    with pytest.raises(FileNotFoundError):
        fs.pipe("no-such-bucket-embedrank/x.txt", b"x")
    assert "no-such-bucket-embedrank" not in fs.ls("")


def test_listens_only_on_loopback(s3_server):
    listeners = s3_server.listening_sockets()
    ports = {listener.port for listener in listeners}

    assert int(s3_server.endpoint_url.rsplit(":", 1)[1]) in ports
    assert len(listeners) >= 8, listeners  # master, volume, filer, s3 + gRPC
    for listener in listeners:
        assert ipaddress.ip_address(listener.host) == ipaddress.ip_address("127.0.0.1"), listener
    assert ports <= s3_server.listened_ports, ports - s3_server.listened_ports


def test_weed_only_dials_its_own_ports(s3_server):
    admin_grpc = s3_server.ports["admin.port.grpc"]
    connected = f"Connected to admin server at 127.0.0.1:{admin_grpc}"
    deadline = time.monotonic() + 10
    while connected not in s3_server.log_tail(10_000) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = s3_server.log_tail(10_000)

    assert connected in log, log[-3000:]
    dialed = {int(port) for port in re.findall(r"dial tcp 127\.0\.0\.1:(\d+)", log)}
    assert dialed <= s3_server.listened_ports, dialed - s3_server.listened_ports


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2 `ss`")
def test_ss_sees_only_loopback_listeners(s3_server):
    out = subprocess.run(
        ["ss", "-H", "-ltnup"], check=True, capture_output=True, text=True
    ).stdout
    tag = f"pid={s3_server.pid},"
    ours = [line for line in out.splitlines() if tag in line]

    assert ours, f"ss shows no sockets for pid {s3_server.pid}:\n{out}"
    for line in ours:
        local = line.split()[4]
        host = local.rsplit(":", 1)[0]
        assert host == "127.0.0.1", line


def test_multipart_upload_completes(s3_bucket):
    bucket, options = s3_bucket
    fs = _fs(options)
    part = 5 * 2**20
    payload = os.urandom(2 * part + 123_457)
    path = f"{bucket}/big/blob.bin"

    with fs.open(path, "wb", block_size=part) as fh:
        for offset in range(0, len(payload), 1 << 20):
            fh.write(payload[offset : offset + (1 << 20)])

    info = fs.info(path)
    assert info["size"] == len(payload)
    assert info["ETag"].strip('"').endswith("-3"), info["ETag"]
    assert _fs(options).cat(path) == payload
    assert fs.list_multipart_uploads(bucket) == []
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []


def test_list_multipart_uploads_sees_in_progress_upload(s3_bucket):
    bucket, options = s3_bucket
    fs = _fs(options)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key="pending.bin")

    pending = fs.list_multipart_uploads(bucket)
    assert [(u["Key"], u["UploadId"]) for u in pending] == [
        ("pending.bin", upload["UploadId"])
    ]

    fs.clear_multipart_uploads(bucket)
    assert fs.list_multipart_uploads(bucket) == []


def _fake_weed(tmp_path, body):
    script = tmp_path / "weed"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_dead_server_reports_log_tail(tmp_path):
    binary = _fake_weed(tmp_path, 'echo "boom: cannot start" >&2\nexit 3\n')
    server = S3Server(binary=binary, startup_timeout=10)

    with pytest.raises(S3ServerError) as excinfo:
        server.start()

    assert "exited with code 3" in str(excinfo.value)
    assert "boom: cannot start" in str(excinfo.value)
    assert server.pid is None and server.workdir is None


def test_never_ready_server_times_out_and_is_killed(tmp_path):
    body = (
        f"echo $$ > {tmp_path}/leader.pid\n"
        f"sleep 300 & echo $! > {tmp_path}/child.pid\n"
        "echo still booting\n"
        "wait\n"
    )
    server = S3Server(binary=_fake_weed(tmp_path, body), startup_timeout=1.5)

    started = time.monotonic()
    with pytest.raises(S3ServerError) as excinfo:
        server.start()

    assert time.monotonic() - started < 10
    assert "not ready after" in str(excinfo.value)
    assert "still booting" in str(excinfo.value)
    pids = [int((tmp_path / name).read_text()) for name in ("leader.pid", "child.pid")]
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)
