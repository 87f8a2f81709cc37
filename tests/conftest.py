"""Shared pytest fixtures, and the markers that sort tests into tiers.

`make test-fast` runs `-m "not integration and not slow and not gpu"`: unit tests, no Ray, no S3 server,
no job process. A test that uses ``ray_local``, ``s3_server`` or ``s3_bucket`` is marked ``integration``
here, so none can forget it; a unit test that starts Ray anyway fails, naming the marker it lacks.

S3 tests talk to a private SeaweedFS server on 127.0.0.1 (see
``tests/support/s3_server.py``).  No AWS environment variables are exported:
clients get the endpoint and credentials explicitly through
``storage_options``, so nothing can fall through to real AWS.
"""

from __future__ import annotations

import os
import sys
import uuid

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Data's autoscaling coordinator (one per cluster) reserves the cluster's resources for each running
# dataset until the dataset cancels or stops renewing the request (every 10 s); a driver killed on purpose
# (the crash tests) cancels nothing, so its reservation would throttle the next job on the session's Ray for
# Ray's default 180 s. Read by every driver of the session, in-process or a job process, at import.
os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")

import pytest

from support.s3_server import S3Server

INTEGRATION_FIXTURES = {"ray_local", "s3_server", "s3_bucket", "postgres_server"}
KEEP_IDLE_WORKERS = {"num_workers_soft_limit": 6, "idle_worker_killing_time_threshold_ms": 3_600_000}
TIER_MARKERS = ("integration", "slow", "gpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    # Files holding `slow` tests (job processes, own clusters) first, then other integration files, unit files
    # last, each file's tests kept together and in order: with `make test`'s two workers the long files start
    # early and the short ones fill the gaps at the end, instead of one worker finishing a long file alone.
    weight: dict[str, int] = {}
    for item in items:
        tier = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("integration") else 2
        weight[item.nodeid.split("::")[0]] = min(tier, weight.get(item.nodeid.split("::")[0], 2))
    items.sort(key=lambda item: weight[item.nodeid.split("::")[0]])  # stable: file order kept within a tier


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """The fast tier's promise, checked: a test without a tier marker must not leave a Ray running."""
    if any(request.node.get_closest_marker(m) for m in TIER_MARKERS) or _ray_is_up():
        yield
        return
    yield
    if _ray_is_up():
        pytest.fail("this test started Ray: mark it `integration` (or use the `ray_local` fixture)")


@pytest.fixture(scope="session")
def s3_server():
    """A started ``S3Server`` shared by the whole session."""
    with S3Server() as server:
        yield server
        # The session Ray's idle workers hold keep-alive connections to the server, and SeaweedFS waits for
        # open connections when asked to stop: stop Ray first (ray_local's own shutdown is then a no-op).
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL cluster on 127.0.0.1 (``support.postgres.PostgresServer``), shared by the session: the
    database of an Iceberg SQL catalog server. Skipped where Debian's PostgreSQL is not installed."""
    from support.postgres import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql): no catalog server to test against")
    with PostgresServer(bin_dir) as server:
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


@pytest.fixture(scope="session", autouse=True)
def _session_model_cache(tmp_path_factory):
    """Model copies and tokenizer specs (`common.model_cache`, `actors.tokenizer_cache`) go to a session temp
    dir, never to ~/.cache; job processes and Ray workers inherit it."""
    os.environ["EMBEDRANK_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the session: 2 CPUs, no dashboard, loopback only; token auth off in tests only.

    Its workers cache URL models (model.path: s3://…) in a session temp dir, never in ~/.cache.
    Idle workers are kept for the session (Ray's default kills those past one per CPU after 1 s): every
    in-process job of the session is one Ray job, so its read/tokenize/write/join tasks reuse workers that
    have already imported ray.data, pandas, pyarrow and s3fs, seconds of CPU per worker start on 2 cores."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config=KEEP_IDLE_WORKERS)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def session_ray(ray_local):
    """The session Ray's address: a job run as its own process joins it (`run.ray_address`) as a driver joins
    a cluster, instead of starting a Ray of its own (`support.jobs`)."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def tiny_reranker_model(tmp_path_factory):
    """A randomly initialised Qwen3ForCausalLM (hidden 64, 2 layers) with the real Qwen tokenizer."""
    from actors.random_qwen import build_random_qwen3

    return build_random_qwen3(tmp_path_factory.mktemp("models") / "qwen3-reranker-tiny", kind="reranker", seed=1)
