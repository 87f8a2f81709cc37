"""Shared pytest fixtures.

S3 tests talk to a private SeaweedFS server on 127.0.0.1 (see
``tests/support/s3_server.py``).  No AWS environment variables are exported:
clients get the endpoint and credentials explicitly through
``storage_options``, so nothing can fall through to real AWS.
"""

from __future__ import annotations

import os
import uuid

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from support.s3_server import S3Server


@pytest.fixture(scope="session")
def s3_server():
    """A started ``S3Server`` shared by the whole session."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, uniquely named bucket: ``(bucket_name, storage_options)``."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.make_bucket(name)
    yield name, s3_server.storage_options()


@pytest.fixture(scope="session")
def tiny_embedding_model(tmp_path_factory):
    """A randomly initialised Qwen3 embedding model (hidden 64, 2 layers) with the real Qwen tokenizer."""
    from actors.random_qwen import build_random_qwen3

    return build_random_qwen3(tmp_path_factory.mktemp("models") / "qwen3-embedding-tiny", kind="embedding")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the session: 2 CPUs, no dashboard, loopback only; token auth off in tests only.

    Its workers cache URL models (model.path: s3://…) in a session temp dir, never in ~/.cache."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["EMBEDRANK_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_reranker_model(tmp_path_factory):
    """A randomly initialised Qwen3ForCausalLM (hidden 64, 2 layers) with the real Qwen tokenizer."""
    from actors.random_qwen import build_random_qwen3

    return build_random_qwen3(tmp_path_factory.mktemp("models") / "qwen3-reranker-tiny", kind="reranker", seed=1)
