"""Fixtures of the output room's tests."""

import pytest

from pipelines.storage import Storage


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    """An empty output root on local disk or on the test S3 server (SeaweedFS)."""
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    bucket, options = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/out", options)
