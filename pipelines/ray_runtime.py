"""Starting or joining Ray for a job, streaming a Ray Data graph's output to the driver under the watchdog, and
stopping cleanly.

Output: unless `--verbose`, only embedrank's own lines and real warnings and errors reach the terminal. Ray's
logs stay in its session's log directory (printed at start): its loggers print errors only, worker output
is not forwarded (`log_to_driver=False`; errors the raylet reports still are), Ray Data's console and Ray's
Python warnings show errors only (`quiet_ray_warnings`), Ray's notice that token authentication is on is dropped, and
(in the `embedrank` command only) the info/warning/error lines that Ray's C++ core writes to the driver's
stderr besides its log file (e.g. a `core_worker.cc` error about constructor arguments for every actor pool) are
filtered out of file descriptor 2.

Stop: the `embedrank` command runs a job inside `driver_session`: SIGINT and SIGTERM raise `Stopped` on the
driver's thread. While the driver waits for the pipeline (`stop_allowed`) that happens at once; while it
commits (`stop_deferred`) it waits until the rows in hand are committed, so that no item is left half-written
(a second signal stops at once, a third exits without cleanup). On the way out the running pipeline is
force-stopped (the watchdog's stop: actors killed, tasks cancelled), the lock released, and a local Ray this
process started is shut down with every process of it (`shutdown_local_ray`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from pipelines.config import RunConfig
from pipelines.periodic import every
from pipelines.progress import emit, forget

RESOURCE_REQUEST_EXPIRE_S = "30"
"""Ray Data keeps a running dataset's resource request with the cluster's autoscaling coordinator, renewed every
10 s, for `RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S` (Ray's default 180 s) after its driver last renewed it: a
killed driver's request would hold a rerun on the same cluster back for three minutes. Read by the driver when
Ray Data's cluster autoscaler module is imported, so it is set before any Ray import here (a user's own value
wins)."""
os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", RESOURCE_REQUEST_EXPIRE_S)
from pipelines.resources import Autoscaler, ClusterView, pending_line, read_only_monitor
from pipelines.watchdog import iter_batches_watched


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM on the driver. A KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


@dataclasses.dataclass(frozen=True)
class RayStart:
    """How and when `ensure_ray` brought Ray up in this process (wall-clock times, `time.time()`)."""

    how: str
    """`started` (a local Ray) or `joined` (a cluster)."""
    began: float
    ready: float


def last_ray_start() -> RayStart | None:
    """When this process last started or joined Ray (None: never; a caller's own `ray.init` is not counted)."""
    return _driver.ray_start


@dataclasses.dataclass
class _Driver:
    verbose: bool = False
    session: bool = False
    """Inside `driver_session` (the `embedrank` command): Ray's native stderr may be filtered, signals stop."""
    started_local: bool = False
    undo_stderr: Callable[[], None] | None = None
    signals: int = 0
    deferring: int = 0
    allowed: int = 0
    pending: Stopped | None = None
    autoscaler: str | None = None
    """What may add nodes to the joined cluster, as the job's start found it (`ray_view`)."""
    ray_start: RayStart | None = None
    """The last time this process started or joined Ray (`ensure_ray`), for the job summary's start-up line."""
    previous_handlers: dict[int, Any] = dataclasses.field(default_factory=dict)


_driver = _Driver()


# -- stop -----------------------------------------------------------------------------------------------------


def _on_signal(signum: int, frame: Any) -> None:
    _driver.signals += 1
    if _driver.signals >= 3:
        os._exit(128 + signum)
    stop = Stopped(signum)
    if _driver.signals == 1 and _driver.deferring and not _driver.allowed:
        _driver.pending = stop
        return
    raise stop


def _install_stop_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not _on_signal:
            _driver.previous_handlers.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, _on_signal)


@contextlib.contextmanager
def stop_deferred() -> Iterator[None]:
    """A region that a stop must not cut (commits, the end of a run): a signal here stops the job when the region
    ends or when the driver next waits for the pipeline, whichever comes first."""
    _driver.deferring += 1
    try:
        yield
    finally:
        _driver.deferring -= 1
    if _driver.pending is not None and not _driver.deferring:
        stop, _driver.pending = _driver.pending, None
        raise stop


@contextlib.contextmanager
def stop_allowed() -> Iterator[None]:
    """Where the driver only waits for the pipeline: a signal stops the job at once (a deferred one now)."""
    if _driver.pending is not None:
        stop, _driver.pending = _driver.pending, None
        raise stop
    _driver.allowed += 1
    try:
        yield
    finally:
        _driver.allowed -= 1


@contextlib.contextmanager
def driver_session(verbose: bool = False) -> Iterator[None]:
    """The `embedrank` command's run of a job: Ray's own output quiet unless `verbose`, SIGINT/SIGTERM stop the
    job (`Stopped`), and on the way out (done, failed or stopped) a local Ray this process started is shut down
    with all its processes."""
    _driver.verbose, _driver.session, _driver.signals, _driver.pending = verbose, True, 0, None
    forget()
    _install_stop_handlers()
    try:
        yield
    finally:
        try:
            shutdown_local_ray()
        finally:
            for signum, handler in _driver.previous_handlers.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(signum, handler)
            _driver.previous_handlers.clear()
            if _driver.undo_stderr is not None:
                _driver.undo_stderr()
                _driver.undo_stderr = None
            _driver.session = False


def shutdown_local_ray() -> None:
    """Shut down the local Ray this process started, then kill any of its processes still alive (workers whose
    raylet is gone would otherwise linger). Processes of any other Ray are never touched."""
    if not _driver.started_local:
        return
    import ray

    _driver.started_local = False
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


# -- what the Ray a job runs on offers (the decisions are `pipelines.resources`') -----------------------------


def local_view() -> ClusterView:
    """This machine as the embedded local Ray will see it (Ray's own detection: cgroups, CUDA_VISIBLE_DEVICES,
    accelerator types), without starting Ray."""
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        found = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1").to_resource_dict()
    except Exception:  # noqa: BLE001 - a Ray that moved its private API: count the CPUs ourselves
        found = {"CPU": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1}
    return ClusterView([{k: float(v) for k, v in found.items()}], "none", local=True)


def _autoscaler(wait_s: float = 0.0) -> tuple[Autoscaler, list[dict[str, float]]]:
    """What may add nodes to the joined cluster: node types where its autoscaler reports them to the GCS
    (`ClusterConfig`); none when the head's monitor runs the read-only provider (a cluster started without an
    autoscaling config); else unknown. `wait_s`: how long to wait for a just-started head's first report."""
    groups = []
    with contextlib.suppress(Exception):  # a Ray that moved its private API: as if it exposed no node types
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
        groups = [g for g in (config.node_group_configs if config else []) if g.resources and g.max_count != 0]
    if groups:
        scales = any(g.max_count == -1 or g.max_count > g.min_count for g in groups)
        return ("types" if scales else "none"), [{k: float(v) for k, v in g.resources.items()} for g in groups]
    with contextlib.suppress(Exception):
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            wait_s = 0.0  # its monitor writes no v1 status report
    deadline = time.monotonic() + wait_s
    status = _autoscaling_status()
    while not _node_types_reported(status) and time.monotonic() < deadline:
        time.sleep(0.5)
        status = _autoscaling_status()
    return ("none" if read_only_monitor(status) else "unknown"), []


def _node_types_reported(status: dict[str, Any]) -> bool:
    """Whether the monitor has reported the nodes' types yet (its first reports may have none)."""
    return bool((status.get("autoscaler_report") or {}).get("node_type_mapping"))


def _autoscaling_status() -> dict[str, Any]:
    """The head monitor's last status report (autoscaler v1), or {}."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
        return json.loads(raw) if raw else {}
    except Exception:  # noqa: BLE001
        return {}


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local Ray: no autoscaler)."""
    import ray._private.worker

    node = ray._private.worker._global_node
    return node is not None and bool(getattr(node, "head", False))


def ray_view() -> ClusterView:
    """The connected Ray: its alive nodes and its autoscaler."""
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    if started_here():
        return ClusterView(nodes, "none", local=True)
    kind, types = _autoscaler(wait_s=15.0)
    _driver.autoscaler = kind
    return ClusterView(nodes, kind, types)


def cluster_view(run: RunConfig, stream: TextIO | None = None) -> ClusterView:
    """The Ray a job with `run` runs on: the connected one, the cluster at its address (joined now), or this
    machine as the embedded local Ray will see it (Ray is not started for that)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray_view()
    if run.ray_address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(run.ray_address, stream)
        return ray_view()
    return local_view()


@contextlib.contextmanager
def report_pending(interval_s: float, stream: TextIO, last_output: list[float], pool: Any = None) -> Iterator[None]:
    """On a joined cluster with an autoscaler, print every `interval_s` what the job waits for while no output
    arrived for that long (`last_output[0]`: monotonic time of the last one), with the model pool's replicas
    (`pool`, a `resources.PoolReport`, where given). A no-op elsewhere."""
    try:
        joined = not started_here() and (_driver.autoscaler or _autoscaler()[0]) != "none"
    except Exception:  # noqa: BLE001
        joined = False
    if not joined:
        yield
        return
    def watch() -> None:
        if time.monotonic() - last_output[0] < interval_s:
            return
        line = pending_line(_autoscaling_status())
        if line:
            emit(stream, line + (f" · {pool.short()}" if pool is not None and pool.samples else ""))

    with every(interval_s, watch, "embedrank-pending", join_s=1.0):
        yield


# -- quiet output ---------------------------------------------------------------------------------------------


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_NATIVE_LOG = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] ")


def _filter_native_stderr() -> Callable[[], None] | None:
    """Route file descriptor 2 through a thread that drops the log lines of Ray's C++ core (they are in its log
    file too; fatal ones pass), while Python's own stderr keeps the original descriptor. Only for a process's
    real stderr (never under a test's capture); returns the undo."""
    try:
        if sys.stderr is not sys.__stderr__ or sys.stderr.fileno() != 2:
            return None
    except (AttributeError, ValueError, OSError):
        return None
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    python_stderr = open(original, "w", buffering=1, encoding=sys.__stderr__.encoding or "utf-8",  # noqa: SIM115
                         errors="backslashreplace", closefd=False)
    sys.stderr = python_stderr
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with open(read_end, "rb") as native:
            for line in native:
                if not _NATIVE_LOG.match(line):
                    with contextlib.suppress(OSError):
                        os.write(original, line)

    thread = threading.Thread(target=pump, name="embedrank-stderr", daemon=True)
    thread.start()

    def undo() -> None:
        with contextlib.suppress(ValueError, OSError):
            python_stderr.flush()
        os.dup2(original, 2)  # closes the pipe's write end: the pump drains it and ends
        thread.join(timeout=2.0)
        sys.stderr = sys.__stderr__

    return undo


def _add_filter_once(target: logging.Filterer, *starts: str) -> None:
    if not any(isinstance(f, _DropMessages) and f.starts == starts for f in target.filters):
        target.addFilter(_DropMessages(*starts))


def _quiet_ray_logs() -> None:
    """Before `ray.init`: Ray's notice that token authentication is on dropped, and in the `embedrank` command
    the log lines of Ray's C++ core filtered out of the driver's stderr."""
    _add_filter_once(logging.getLogger("ray._private.authentication.authentication_token_setup"),
                     "Token authentication is enabled for this Ray cluster")
    if _driver.session and _driver.undo_stderr is None:
        _driver.undo_stderr = _filter_native_stderr()


def ensure_ray(address: str | None = None, stream: TextIO | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); with neither, start a private local Ray bound to loopback. Prints one
    line saying which, and where Ray's logs are."""
    began = time.time()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    verbose = _driver.verbose
    if not verbose:
        _quiet_ray_logs()
    options: dict[str, Any] = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **options)
        line = f"ray: joined the Ray cluster at {address}"
    else:
        _driver.started_local = True
        ray.init(address="local", include_dashboard=False, **options)
        line = "ray: started a local Ray"
    _driver.ray_start = RayStart("joined" if address else "started", began, time.time())
    if _driver.session:
        _install_stop_handlers()  # ray.init replaced SIGTERM's handler with its own
    with contextlib.suppress(Exception):
        logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
        line += f" (its logs: {logs}{'' if verbose else '; --verbose shows them here'})"
    emit(stream or sys.stderr, line)


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


def quiet_ray_data() -> None:
    """Our own progress lines replace Ray Data's progress bars; its console shows warnings and errors only (all
    of it with `--verbose`; its log file in Ray's log directory keeps everything)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if _driver.verbose:
        return
    quiet_ray_warnings()
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.ERROR)


def quiet_ray_warnings() -> None:
    """Without `--verbose` no Ray warning reaches the terminal (e.g. Ray Data's "Specifying both num_cpus and
    num_gpus for map tasks is experimental" on every GPU job): Ray Data's console handler and Ray's own logger
    show errors only, and Python warnings raised in Ray's modules are ignored. Ray's log files keep them all."""
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    logging.getLogger("ray").setLevel(logging.ERROR)


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


# -- the model pool while a job runs ----------------------------------------------------------------------------


def _pool_state(job_id: str | None) -> tuple[int, int]:
    """(alive, alive or waiting to be placed) model replicas of this driver's job: Ray Data's actor pools
    (`MapWorker(MapBatches(<replica class>))`) in the GCS's actor table."""
    import ray
    from ray._private.state import state

    alive = wanted = 0
    for actor in state.actor_table(None, job_id=ray.JobID.from_hex(job_id) if job_id else None).values():
        if not str(actor.get("ActorClassName", "")).startswith("MapWorker("):
            continue
        alive += actor.get("State") == "ALIVE"
        wanted += actor.get("State") not in ("DEAD",)
    return alive, wanted


def _pending_nodes(status: dict[str, Any]) -> int:
    """Node launches the autoscaler reports as pending (queued or starting)."""
    report = status.get("autoscaler_report") or {}
    return sum(int(v) for v in (report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes")
                                                                                    or [])


@contextlib.contextmanager
def watch_pool(report: Any, queued: Callable[[], int], interval_s: float = 1.0) -> Iterator[None]:
    """Sample the model pool into `report` (`resources.PoolReport.note`) every `interval_s` while the block runs:
    its replicas from the GCS's actor table, pending node launches from the autoscaler's status, `queued()` items
    not yet committed. A Ray that moved its private state API leaves the report empty (the job runs on)."""
    import ray

    def sample() -> None:
        try:
            if not ray.is_initialized():  # a local Ray starts with the graph
                return
            alive, wanted = _pool_state(ray.get_runtime_context().get_job_id())
            pending = _pending_nodes(_autoscaling_status()) if not started_here() else 0
        except Exception:  # noqa: BLE001 - the report is informative; the job must not fail for it
            return
        report.note(time.monotonic(), alive, wanted, pending, queued())

    try:
        with every(interval_s, sample, "embedrank-pool"):
            yield
    finally:
        sample()
