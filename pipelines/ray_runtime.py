"""Starting or joining Ray for a job, running work on it (a Ray Data graph's output streamed to the driver under
the watchdog, single tasks, planning's reads), and shutting down a local Ray this process started.

Kept to that one job; its neighbours: keeping Ray's output off the terminal is `pipelines.ray_quiet`'s, the
driver's stop on signals `pipelines.driver_session`'s (which runs `shutdown_local_ray` at a session's end), and
reading what the Ray offers and waits for `pipelines.cluster_view`'s (which never starts Ray; `view_for_job`
here joins first where the job names a cluster).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from pipelines.config import RunConfig
from pipelines.progress import emit

RESOURCE_REQUEST_EXPIRE_S = "30"
"""Ray Data keeps a running dataset's resource request with the cluster's autoscaling coordinator, renewed every
10 s, for `RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S` (Ray's default 180 s) after its driver last renewed it: a
killed driver's request would hold a rerun on the same cluster back for three minutes. Read by the driver when
Ray Data's cluster autoscaler module is imported, so it is set before any Ray import here (a user's own value
wins)."""
os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", RESOURCE_REQUEST_EXPIRE_S)
from pipelines.cluster_view import connected, local_view, ray_view, report_pending
from pipelines.driver_session import at_session_end, reinstall_stop_handlers, stop_allowed
from pipelines.driver_session import verbose as session_verbose
from pipelines.ray_quiet import quiet_ray_data, quiet_ray_logs
from pipelines.resources import ClusterView
from pipelines.watchdog import iter_batches_watched


@dataclasses.dataclass(frozen=True)
class RayStart:
    """How and when `ensure_ray` brought Ray up in this process (wall-clock times, `time.time()`)."""

    how: str
    """`started` (a local Ray) or `joined` (a cluster)."""
    began: float
    ready: float


@dataclasses.dataclass
class _Runtime:
    started_local: bool = False
    """This process started the local Ray it is connected to (`shutdown_local_ray` stops it)."""
    ray_start: RayStart | None = None
    """The last time this process started or joined Ray (`ensure_ray`), for the job summary's start-up line."""


_runtime = _Runtime()


def last_ray_start() -> RayStart | None:
    """When this process last started or joined Ray (None: never; a caller's own `ray.init` is not counted)."""
    return _runtime.ray_start


def shutdown_local_ray() -> None:
    """Shut down the local Ray this process started, then kill any of its processes still alive (workers whose
    raylet is gone would otherwise linger). Processes of any other Ray are never touched."""
    if not _runtime.started_local:
        return
    import ray

    _runtime.started_local = False
    import psutil  # ray's vendored copy, on the path once ray is imported

    try:
        mine = psutil.Process().children(recursive=True)
    except psutil.Error:
        mine = []
    with contextlib.suppress(Exception):  # whatever is left is killed below
        ray.shutdown()
    _, alive = psutil.wait_procs(mine, timeout=5.0)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5.0)


at_session_end(shutdown_local_ray)


def ensure_ray(address: str | None = None, stream: TextIO | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); with neither, start a private local Ray bound to loopback. Prints one
    line saying which, and where Ray's logs are."""
    began = time.time()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    verbose = session_verbose()
    if not verbose:
        quiet_ray_logs()
    options: dict[str, Any] = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **options)
        line = f"ray: joined the Ray cluster at {address}"
    else:
        _runtime.started_local = True
        ray.init(address="local", include_dashboard=False, **options)
        line = "ray: started a local Ray"
    _runtime.ray_start = RayStart("joined" if address else "started", began, time.time())
    reinstall_stop_handlers()  # in a session: ray.init replaced SIGTERM's handler with its own
    with contextlib.suppress(Exception):
        logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
        line += f" (its logs: {logs}{'' if verbose else '; --verbose shows them here'})"
    emit(stream or sys.stderr, line)


def view_for_job(run: RunConfig, stream: TextIO | None = None) -> ClusterView:
    """The Ray a job with `run` runs on: the connected one, the cluster at its address (joined now), or this
    machine as the embedded local Ray will see it (Ray is not started for that)."""
    if connected():
        return ray_view()
    if run.ray_address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(run.ray_address, stream)
        return ray_view()
    return local_view()


@contextlib.contextmanager
def block_size(block_mb: float | None) -> Iterator[None]:
    """Ray Data's largest block set to `run.block_mb` while a graph runs (None: left as it is), then restored."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.target_max_block_size
    if block_mb is not None:
        ctx.target_max_block_size = int(block_mb * 2**20)
    try:
        yield
    finally:
        ctx.target_max_block_size = before


def stream_rows(build_graph: Callable[[], Any], run: RunConfig, stream: TextIO | None = None,
                pool: Any = None) -> Iterator[dict[str, Any]]:
    """Ray up, the graph built, its output rows handed over one by one as they arrive; a stall fails the job
    naming the stuck stage (`run.stall_timeout_s`, `run.startup_timeout_s` for the first output). A stop signal
    cuts the wait for the next batch, never the caller's handling of a row (`stop_allowed`); on a cluster with
    an autoscaler, what the job waits for (and the model pool, `pool`) is printed every `run.progress_interval_s`
    while no output arrives."""
    ensure_ray(run.ray_address, stream)
    quiet_ray_data()
    last_output = [time.monotonic()]
    with report_pending(run.progress_interval_s, stream or sys.stderr, last_output, pool), \
            block_size(run.block_mb):
        # prefetch_batches=0: each output block is handed over as soon as it exists (Ray Data's default, 1, holds
        # it back until the next one exists too: a commit waited for the next write, up to a replica call's work)
        batches = iter_batches_watched(build_graph(), run.stall_timeout_s, run.startup_timeout_s,
                                       batch_format="pyarrow", batch_size=None, prefetch_batches=0)
        try:
            while True:
                with stop_allowed():
                    batch = next(batches, None)
                if batch is None:
                    return
                last_output[0] = time.monotonic()
                yield from batch.to_pylist()
        finally:
            batches.close()


def run_task(fn: Callable[..., Any], *args: Any, num_cpus: float = 1.0, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` as one task on the cluster (Ray is up: called while a graph runs), waited for; a task
    whose worker dies is retried by Ray (`max_retries`), so `fn` must be safe to run twice."""
    import ray

    return ray.get(ray.remote(fn).options(num_cpus=num_cpus, max_retries=3).remote(*args, **kwargs))


def map_on_cluster(run: RunConfig, stream: TextIO | None = None, num_cpus: float = 0.25) -> Callable[..., list[Any]]:
    """`on_cluster(fn, args, **kwargs)`: `[fn(a, **kwargs) for a in args]`, each call a Ray task (Ray started or joined on first use, as
    `run` says), results in order; for planning's footer reads (`pipelines.input.plan.make_plan`), which are I/O
    and parsing, so each task asks for a fraction of a CPU."""
    def on_cluster(fn: Callable[..., Any], args: list[Any], **kwargs: Any) -> list[Any]:
        ensure_ray(run.ray_address, stream)
        import ray

        remote = ray.remote(fn).options(num_cpus=num_cpus, max_retries=3)
        return ray.get([remote.remote(a, **kwargs) for a in args])

    return on_cluster
