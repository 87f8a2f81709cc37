"""What the Ray a job runs on offers and what it is doing, read without starting or joining it: this machine as
the embedded local Ray will see it, a connected cluster's nodes and autoscaler, what an autoscaled job waits
for, and the model pool's replicas while a job runs.

The decisions made from these views (`auto` fitted, impossible requests refused, the pending line's wording) are
`pipelines.resources`', which never touches Ray; starting or joining Ray is `pipelines.ray_runtime`'s, which uses
this module (never the other way round) to report what a running graph waits for.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from pipelines.config import RunConfig
from pipelines.periodic import every
from pipelines.progress import emit
from pipelines.resources import Autoscaler, ClusterView, pending_line, read_only_monitor

_seen: dict[str, Autoscaler] = {}
"""`autoscaler`: what may add nodes to the joined cluster, as the job's start found it (`ray_view`)."""


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local Ray: no autoscaler)."""
    import ray._private.worker

    node = ray._private.worker._global_node
    return node is not None and bool(getattr(node, "head", False))


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


def ray_view() -> ClusterView:
    """The connected Ray: its alive nodes and its autoscaler."""
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    if started_here():
        return ClusterView(nodes, "none", local=True)
    kind, types = _autoscaler(wait_s=15.0)
    _seen["autoscaler"] = kind
    return ClusterView(nodes, kind, types)


def connected() -> bool:
    """Whether this process is connected to a Ray (its own `ray.init` counts); never imports Ray to find out."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def dry_run_view(run: RunConfig) -> ClusterView:
    """What a dry run fits `auto` to: the connected Ray or, with no cluster address, this machine; a dry run never
    joins a cluster (with an address: a cluster nothing is known of)."""
    if connected():
        return ray_view()
    if run.ray_address or os.environ.get("RAY_ADDRESS"):
        return ClusterView([], "unknown")
    return local_view()


@contextlib.contextmanager
def report_pending(interval_s: float, stream: TextIO, last_output: list[float], pool: Any = None) -> Iterator[None]:
    """On a joined cluster with an autoscaler, print every `interval_s` what the job waits for while no output
    arrived for that long (`last_output[0]`: monotonic time of the last one), with the model pool's replicas
    (`pool`, a `resources.PoolReport`, where given). A no-op elsewhere."""
    try:
        joined = not started_here() and (_seen.get("autoscaler") or _autoscaler()[0]) != "none"
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
