"""Integration tests for the fault-injecting proxy, against the real S3 server.

Also pins down what SeaweedFS does with pending multipart uploads, which
clean-up code after interrupted writes relies on.
"""

import os
from urllib.parse import urlsplit

import pytest
import s3fs
from botocore.exceptions import ClientError, EndpointConnectionError

from support.faulty_proxy import FaultyProxy

# Tests that use the server are marked `integration` by conftest (their fixtures); the rest are unit tests.


def _fs(storage_options, **overrides):
    options = {**storage_options, **overrides}
    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


def _proxy_for(storage_options, **kwargs) -> FaultyProxy:
    upstream = urlsplit(storage_options["endpoint_url"])
    return FaultyProxy(upstream.hostname, upstream.port, **kwargs)


def _cause(exc, kind):
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__ or exc.__context__
    return exc


def test_s3fs_survives_faults_with_default_retries(s3_bucket):
    """Default s3fs/botocore retries ride out a high fault rate with exact results."""
    bucket, options = s3_bucket
    payloads = {f"{bucket}/run/obj-{i:03d}.bin": os.urandom(64 + i) for i in range(60)}
    doomed = sorted(payloads)[::4]
    kept = sorted(set(payloads) - set(doomed))

    with _proxy_for(options, fault_rate=0.2, seed=1) as proxy:
        fs = _fs(options, endpoint_url=proxy.endpoint_url)
        for path, data in payloads.items():  # one by one: a fixed fault sequence
            fs.pipe_file(path, data)
        write_stats = proxy.stats
        assert sorted(fs.ls(f"{bucket}/run", detail=False, refresh=True)) == sorted(payloads)
        assert fs.cat(list(payloads)) == payloads  # concurrent GETs
        fs.rm(doomed)  # one DeleteObjects POST
        assert sorted(fs.ls(f"{bucket}/run", detail=False, refresh=True)) == kept
        stats = proxy.stats

    direct = _fs(options)
    assert sorted(direct.find(f"{bucket}/run")) == kept
    assert direct.cat(kept) == {path: payloads[path] for path in kept}
    assert stats["requests"] > len(payloads) * 2
    for kind in ("503", "reset", "reset_after"):
        assert write_stats[kind] >= 1, write_stats  # deterministic for this seed


def test_passthrough_when_faults_disabled(s3_bucket):
    bucket, options = s3_bucket
    with _proxy_for(options, fault_rate=1.0) as proxy:
        proxy.faults_enabled = False
        fs = _fs(options, endpoint_url=proxy.endpoint_url)
        fs.pipe_file(f"{bucket}/a", b"hello")  # PUT with Expect: 100-continue
        assert fs.cat_file(f"{bucket}/a") == b"hello"
        assert fs.info(f"{bucket}/a")["size"] == 5  # HEAD
        stats = proxy.stats
    assert stats["requests"] >= 3
    assert stats["503"] == stats["reset"] == stats["reset_after"] == 0


def test_wrong_secret_still_denied_through_proxy(s3_bucket):
    """Signatures are checked upstream on the bytes the client sent."""
    bucket, options = s3_bucket
    with _proxy_for(options, fault_rate=0.0) as proxy:
        fs = _fs(options, endpoint_url=proxy.endpoint_url, secret="wrong")
        with pytest.raises(PermissionError):
            fs.pipe_file(f"{bucket}/a", b"x")


def _no_retries(options, proxy):
    fs = _fs(
        options,
        endpoint_url=proxy.endpoint_url,
        config_kwargs={**options["config_kwargs"], "retries": {"total_max_attempts": 1}},
    )
    fs.retries = 1  # s3fs's own retry loop; a class attribute, not an __init__ option
    return fs


def test_503_is_an_s3_slow_down(s3_bucket):
    bucket, options = s3_bucket
    with _proxy_for(options, fault_rate=1.0, kinds=("503",)) as proxy:
        with pytest.raises(OSError) as info:
            _no_retries(options, proxy).call_s3("list_objects_v2", Bucket=bucket)
    error = _cause(info.value, ClientError)
    assert error.response["Error"]["Code"] == "SlowDown"
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert proxy.stats == {"requests": 1, "503": 1, "reset": 0, "reset_after": 0}


@pytest.mark.parametrize("kind", ["reset", "reset_after"])
def test_reset_kinds_differ_in_whether_the_write_happened(s3_bucket, kind):
    bucket, options = s3_bucket
    path = f"{bucket}/{kind}.bin"
    with _proxy_for(options, fault_rate=1.0, kinds=(kind,)) as proxy:
        with pytest.raises(EndpointConnectionError):  # ECONNRESET, not retried by s3fs
            _no_retries(options, proxy).pipe_file(path, b"payload")
        assert proxy.stats[kind] >= 1
    assert _fs(options).exists(path) is (kind == "reset_after")


def test_seaweedfs_pending_multipart_uploads(s3_bucket):
    """What SeaweedFS supports for finding and aborting abandoned uploads.

    ListMultipartUploads honours ``Prefix`` but orders by UploadId (not key)
    and pages by ``UploadIdMarker`` only, with no ``NextKeyMarker``; so list
    per prefix and abort until empty rather than trusting pagination.
    s3fs's ``list_multipart_uploads(bucket)`` takes no prefix and reads one page.
    """
    bucket, options = s3_bucket
    fs = _fs(options)
    keys = ["run-1/part-0.parquet", "run-1/part-1.parquet", "run-2/part-0.parquet"]
    ids = {key: fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"] for key in keys}
    fs.call_s3(
        "upload_part", Bucket=bucket, Key=keys[0], UploadId=ids[keys[0]], PartNumber=1, Body=b"abc"
    )

    assert fs.find(bucket) == []  # pending uploads are not objects
    assert sorted(u["Key"] for u in fs.list_multipart_uploads(bucket)) == keys
    listed = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix="run-1/")
    pending = {u["Key"]: u["UploadId"] for u in listed["Uploads"]}
    assert pending == {key: ids[key] for key in keys[:2]}

    for key, upload_id in pending.items():
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    # Aborting again is a no-op success, so clean-up may be retried blindly.
    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=keys[0], UploadId=ids[keys[0]])

    left = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix="run-1/")
    assert left.get("Uploads", []) == []
    with pytest.raises(FileNotFoundError):
        fs.call_s3(
            "upload_part", Bucket=bucket, Key=keys[0], UploadId=ids[keys[0]], PartNumber=2, Body=b"x"
        )
    assert [u["Key"] for u in fs.list_multipart_uploads(bucket)] == keys[2:]
    fs.abort_mpu(bucket, keys[2], ids[keys[2]])
    assert fs.list_multipart_uploads(bucket) == []


def test_chunked_request_body_is_forwarded_verbatim():
    """No S3 client sends one today, but a chunked body must not hang the proxy."""
    import http.client
    import socket
    import threading

    received = []
    upstream = socket.create_server(("127.0.0.1", 0))

    def serve_once():
        conn, _ = upstream.accept()
        with conn:
            data = b""
            while not data.endswith(b"0\r\n\r\n"):
                data += conn.recv(65536)
            received.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    with upstream, FaultyProxy("127.0.0.1", upstream.getsockname()[1], fault_rate=0.0) as proxy:
        client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        client.request("PUT", "/b/k", body=iter([b"hello ", b"world"]), encode_chunked=True)
        response = client.getresponse()
        assert (response.status, response.read()) == (200, b"ok")
        assert response.getheader("Connection") == "close"
        client.close()
    thread.join(5)
    head, _, body = received[0].partition(b"\r\n\r\n")
    assert body == b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
    assert b"Transfer-Encoding: chunked" in head
    assert head.endswith(b"Connection: close")
