"""Fitting a job's compute settings to the Ray it runs on: `auto` values resolved, impossible requests refused.

Before any output is touched, the lifecycle looks at the Ray the job will run on (`pipelines.cluster_view`, which
reads Ray; `ray_runtime.view_for_job` joins a cluster first) and hands the view in: the embedded local Ray is this
machine as Ray will detect it (found without starting Ray), a joined cluster is the alive nodes Ray reports and,
where Ray exposes it, its autoscaler. This module decides, without Ray and without importing the modules that
touch it (`tests/test_repo_layout.py` checks).

`auto` (`fit`; explicit values always win):
- with GPUs (`num_gpus > 0`): one replica per `num_gpus` GPUs that Ray reports (`max_replicas`), 1 CPU each
  (less where a GPU node has fewer CPUs to spare);
- on CPU: every node keeps one CPU in 8 (at least one; on a one-CPU node one I/O task's share) for the read,
  tokenize and write tasks, and the rest goes to replicas of up to 8 threads: 2 cores → 1 replica × 1 CPU,
  16 cores → 2 × 7, 64 cores → 7 × 8;
- `num_threads` (torch threads of a CPU replica): its CPUs; but where `num_cpus` is auto too and every node hosts
  at most one replica, the replica's threads also use the node's I/O reserve, which Ray keeps for those tasks
  while they mostly wait (`_threads_beside_io`): 2 cores → 1 replica × 1 CPU running 2 threads, 4 → 1 × 3
  running 4;
- `min_replicas`: all of them on the embedded local Ray (the machine is the job's own), else 1 (on a shared
  or autoscaled cluster the pool grows while work is queued and resources are free).

Feasibility (`check`), on a Ray without an autoscaler (the embedded default, a fixed cluster): a replica's GPUs,
accelerator type and CPUs must fit one node, and `min_replicas` replicas must fit beside at least one I/O task;
otherwise the job is refused in seconds with one line naming the setting (`ResourceError`, exit 2) instead of
waiting for `run.startup_timeout_s` on a request nothing can serve. With an autoscaler whose node types Ray
exposes (`ClusterConfig`), the request is checked against those types; where it exposes none (the cluster
launcher's), `cluster_view.report_pending` says every progress interval what the job waits for.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, TextIO

from common.errors import ResourceError
from pipelines.config import AUTO, ComputeConfig

IO_SHARE = 8
"""A node keeps one CPU in this many (at least one) for the read, tokenize and write tasks when `auto` sizes
CPU replicas."""
THREADS_PER_REPLICA = 8
"""The most threads `auto` gives a CPU replica; more cores make more replicas (torch scales poorly beyond)."""

Autoscaler = Literal["none", "types", "unknown"]


@dataclasses.dataclass(frozen=True)
class ClusterView:
    """What a job's Ray can offer: each alive node's total resources and what an autoscaler may add."""

    nodes: list[dict[str, float]]
    autoscaler: Autoscaler = "none"
    """none: the nodes are all there is; types: an autoscaler may add `node_types`; unknown: an autoscaler of
    unknown node types (nothing can be refused)."""
    node_types: list[dict[str, float]] = dataclasses.field(default_factory=list)
    local: bool = False
    """The embedded local Ray on this machine."""

    def describe(self) -> str:
        """E.g. `local Ray on this machine: 2 CPUs, no GPU`, `2 nodes: 1 × 0 CPUs, 1 × 8 CPUs + 1 GPU (L4)`."""
        if self.local and len(self.nodes) == 1:
            return f"local Ray on this machine: {_shape(self.nodes[0], gpu_none=True)}"
        shapes = Counter(_shape(n) for n in self.nodes)
        text = f"{_count(len(self.nodes), 'node')}: " + ", ".join(f"{k} × {s}" for s, k in shapes.items())
        if self.autoscaler == "types":
            text += "; autoscaler node types: " + ", ".join(_shape(t) for t in self.node_types)
        elif self.autoscaler == "unknown":
            text += "; an autoscaler may add nodes"
        return text

    @property
    def gpus(self) -> float:
        return sum(n.get("GPU", 0.0) for n in self.nodes)


def _accelerators(node: dict[str, float]) -> list[str]:
    return sorted(k.split(":", 1)[1] for k in node if k.startswith("accelerator_type:"))


def _count(quantity: float, unit: str) -> str:
    """`1 CPU`, `2 CPUs`, `0.5 CPUs`."""
    return f"{quantity:g} {unit}" + ("" if quantity == 1 else "s")


def _shape(node: dict[str, float], gpu_none: bool = False) -> str:
    text = _count(node.get("CPU", 0), "CPU")
    if node.get("GPU", 0):
        kinds = _accelerators(node)
        text += f" + {_count(node['GPU'], 'GPU')}" + (f" ({', '.join(kinds)})" if kinds else "")
    elif gpu_none:
        text += ", no GPU"
    return text


def io_reserve(cpus: float, io_num_cpus: float) -> float:
    """CPUs of a node that `auto` leaves to the read, tokenize and write tasks: one in `IO_SHARE`, at least one;
    on a node of less than two CPUs, one I/O task's share."""
    reserve = max(1.0, float(math.ceil(cpus / IO_SHARE)))
    return reserve if cpus - reserve >= 1 else min(io_num_cpus, cpus)


def _round_down(cpus: float) -> float:
    """Whole CPUs from one up; hundredths below (a replica gets at least one thread either way)."""
    return float(math.floor(cpus + 1e-9)) if cpus >= 1 else math.floor(cpus * 100 + 1e-9) / 100


def _hosts_replica(node: dict[str, float], compute: ComputeConfig) -> bool:
    """Whether `node` has the GPUs and accelerator type of one replica (CPUs aside)."""
    if compute.num_gpus > 0 and node.get("GPU", 0) < compute.num_gpus:
        return False
    return not compute.accelerator_type or node.get(f"accelerator_type:{compute.accelerator_type}", 0) > 0


def fit(compute: ComputeConfig, view: ClusterView) -> ComputeConfig:
    """`compute` with every `auto` value decided for `view` (see the module's docstring); explicit values stay."""
    if not compute.auto_fields:
        return compute
    io = compute.io_num_cpus
    cpus, replicas, minimum = compute.num_cpus, compute.max_replicas, compute.min_replicas
    threads = compute.num_threads
    eligible = [n for n in view.nodes if _hosts_replica(n, compute) and n.get("CPU", 0) > 0]
    if compute.num_gpus > 0:
        per_node = [(n, int(n["GPU"] / compute.num_gpus + 1e-9)) for n in eligible]
        if replicas == AUTO:
            replicas = max(1, sum(k for _, k in per_node))
        if cpus == AUTO:
            shares = [(n["CPU"] - io_reserve(n["CPU"], io)) / k for n, k in per_node if k]
            cpus = _round_down(min([1.0, *shares])) or 1.0
    else:
        per_node = [(n["CPU"], n["CPU"] - io_reserve(n["CPU"], io)) for n in eligible]
        spare = [c for _, c in per_node if c > 0]
        if cpus == AUTO:
            if replicas == AUTO:
                top = max(spare, default=1.0)
                cpus = _round_down(top / math.ceil(top / THREADS_PER_REPLICA))
            else:
                cpus = _round_down(min(max(spare, default=1.0), sum(spare) / replicas if spare else 1.0))
            cpus = cpus or 1.0
        if replicas == AUTO:
            replicas = max(1, sum(int(c / cpus + 1e-9) for c in spare))
        if compute.num_threads == AUTO and compute.num_cpus == AUTO:
            threads = _threads_beside_io(per_node, cpus)
    if minimum == AUTO:
        minimum = replicas if view.local else 1
    elif compute.max_replicas == AUTO:
        replicas = max(replicas, minimum)
    if threads == AUTO:
        threads = max(1, int(cpus))
    return compute.model_copy(update={"num_cpus": float(cpus), "max_replicas": int(replicas),
                                      "min_replicas": int(min(minimum, replicas)), "num_threads": int(threads)})


def _threads_beside_io(per_node: list[tuple[float, float]], cpus: float) -> int | str:
    """`auto` threads of CPU replicas of `cpus` CPUs on nodes of (CPUs, CPUs left to replicas): where every node
    hosts at most one replica, the replica's threads take the node's I/O reserve too (up to the whole node, at most
    `THREADS_PER_REPLICA`): the read, tokenize and write tasks keep their CPUs in Ray's accounting, so they are
    always scheduled, but they use them a small part of the time (E8, `benchmarks/e8.py`: on 2 cores one replica
    of 2 threads embedded 1.71× as fast as of 1, the whole job ran 1.40× as fast). With more replicas to a node
    its cores are theirs already: `auto` (their CPUs)."""
    hosted = [(total, int(spare / cpus + 1e-9)) for total, spare in per_node if spare > 0]
    if not hosted or max(k for _, k in hosted) != 1:
        return AUTO
    return max(1, int(cpus), min(int(min(total for total, k in hosted if k)), THREADS_PER_REPLICA))


def check(compute: ComputeConfig, view: ClusterView) -> None:
    """Refuse (ResourceError) a fitted `compute` that `view` can never serve. Without an autoscaler: a replica
    must fit a node, and `min_replicas` replicas must fit beside one I/O task; with known autoscaler node types,
    a replica and an I/O task must each fit a node or a node type; with unknown ones nothing is refused."""
    if view.autoscaler == "unknown" or not view.nodes:
        return
    shapes = view.nodes + (view.node_types if view.autoscaler == "types" else [])
    where = "this Ray cluster" + (" or a node type of its autoscaler" if view.autoscaler == "types" else "")
    about = f" ({view.describe()})"
    gpus, cpus, io, kind = compute.num_gpus, float(compute.num_cpus), compute.io_num_cpus, compute.accelerator_type
    if gpus > 0 and not any(n.get("GPU", 0) for n in shapes):
        raise ResourceError(f"compute.num_gpus={gpus:g}, but {where} has no GPU{about}")
    if kind and not any(n.get(f"accelerator_type:{kind}", 0) for n in shapes):
        found = sorted({a for n in shapes for a in _accelerators(n)})
        raise ResourceError(f"compute.accelerator_type={kind}, but {where} has no {kind} accelerator (types found: "
                            f"{', '.join(found) or 'none named'}){about}")
    if gpus > 0:
        largest = max(n.get("GPU", 0) for n in shapes if not kind or n.get(f"accelerator_type:{kind}", 0))
        if largest < gpus:
            raise ResourceError(f"compute.num_gpus={gpus:g}, but the largest {kind + ' ' if kind else ''}GPU node of "
                                f"{where} has {_count(largest, 'GPU')}{about}")
    hosts = [n for n in shapes if _hosts_replica(n, compute)]
    top = max(n.get("CPU", 0) for n in hosts)
    if top < cpus:
        raise ResourceError(f"compute.num_cpus={cpus:g}, but the largest node{' with the GPUs' if gpus else ''} of "
                            f"{where} has {_count(top, 'CPU')}{about}")
    if max(n.get("CPU", 0) for n in shapes) < io:
        raise ResourceError(f"compute.io_num_cpus={io:g}, but the largest node of {where} has "
                            f"{_count(max(n.get('CPU', 0) for n in shapes), 'CPU')}{about}")
    if view.autoscaler != "none":
        return
    if not _fits_with_io(view.nodes, compute, 1):
        raise ResourceError(f"compute.num_cpus={cpus:g} leaves no CPU for the read, tokenize and write tasks "
                            f"(compute.io_num_cpus={io:g} each): a replica and one of them need {cpus + io:g} CPUs "
                            f"on {where}{about}; lower compute.num_cpus or leave it auto")
    if not _fits_with_io(view.nodes, compute, int(compute.min_replicas)):
        each = _count(cpus, "CPU") + (f" and {_count(gpus, 'GPU')}" if gpus else "")
        raise ResourceError(f"compute.min_replicas={compute.min_replicas} replicas of {each} each do not fit on "
                            f"{where} beside one read, tokenize or write task (compute.io_num_cpus={io:g}){about}; "
                            "lower compute.min_replicas or leave it auto")


def _fits_with_io(nodes: list[dict[str, float]], compute: ComputeConfig, replicas: int) -> bool:
    """Whether `replicas` replicas and one I/O task can all be placed at once (replicas best-fit, then the task)."""
    free = [dict(n) for n in nodes]
    need = {"CPU": float(compute.num_cpus), "GPU": compute.num_gpus}
    for _ in range(replicas):
        fitting = [n for n in free if _hosts_replica(n, compute) and all(n.get(k, 0) + 1e-9 >= v
                                                                         for k, v in need.items() if v)]
        if not fitting:
            return False
        node = min(fitting, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        for k, v in need.items():
            node[k] = node.get(k, 0) - v
    return any(n.get("CPU", 0) + 1e-9 >= compute.io_num_cpus for n in free)


def describe_fit(before: ComputeConfig, after: ComputeConfig, view: ClusterView) -> str:
    """The line printed at start when `auto` decided something."""
    threads = after.num_threads
    device = f"{_count(after.num_gpus, 'GPU')} + {_count(after.num_cpus, 'CPU')}" if after.num_gpus else \
        f"{_count(after.num_cpus, 'CPU')} ({_count(threads, 'thread')})"
    pool = f"{after.max_replicas}" if after.min_replicas == after.max_replicas else \
        f"{after.min_replicas}..{after.max_replicas}"
    replicas = "replica" if after.max_replicas == 1 else "replicas"
    line = (f"compute: {pool} model {replicas} × {device} each; auto: {', '.join(before.auto_fields)}; "
            f"fitted to {view.describe()}")
    if not after.num_gpus and view.gpus:
        line += f"; this Ray has {_count(view.gpus, 'GPU')}: set compute.num_gpus=1 to use them"
    return line


# -- the lifecycle's entry points (the view of the Ray a job runs on is the caller's: `pipelines.cluster_view`) --


def read_only_monitor(status: dict[str, Any]) -> bool:
    """Whether a monitor status report (`__autoscaling_status`) is that of the read-only provider, which Ray runs
    on a head started without an autoscaling config: its node types are the nodes themselves, `node_<id>`."""
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return bool(mapping) and all(kind == f"node_{node}" for node, kind in mapping.items())


def fit_compute(cfg: Any, view: ClusterView, stream: TextIO) -> Any:
    """`cfg` with its compute section fitted to `view` (the job's Ray, `ray_runtime.view_for_job`) and checked:
    prints what `auto` chose; raises ResourceError for a request that Ray can never serve."""
    compute = fit(cfg.compute, view)
    check(compute, view)
    if cfg.compute.auto_fields:
        print(describe_fit(cfg.compute, compute, view), file=stream, flush=True)
    return cfg.model_copy(update={"compute": compute})


def size_pool(compute: ComputeConfig, autoscaler: str, items: int, stream: TextIO) -> ComputeConfig:
    """The fitted `compute` of a run with `items` work items left to process (a resume counts only those): on a
    cluster whose autoscaler adds nodes, the pool's minimum raised so that it asks for its replicas at once
    (`pool_minimum`), said in one line."""
    minimum = pool_minimum(compute, autoscaler, items)
    if minimum == compute.min_replicas:
        return compute
    print(f"compute: the cluster's autoscaler adds nodes: the model pool asks for {minimum} replica(s) at once "
          f"(min_replicas {compute.min_replicas} -> {minimum}; {items} item(s) to process, max_replicas "
          f"{compute.max_replicas}), so that their nodes are launched together", file=stream, flush=True)
    return compute.model_copy(update={"min_replicas": minimum})


def dry_run_compute(cfg: Any, view: Callable[[], ClusterView]) -> ComputeConfig:
    """The compute a dry run estimates with: `auto` fitted to `view()` (`cluster_view.dry_run_view`: the
    connected Ray or this machine; a dry run never joins a cluster and never refuses, it may plan a job for
    another machine), which is only looked at when something is `auto`."""
    if not cfg.compute.auto_fields:
        return cfg.compute
    return fit(cfg.compute, view())


# -- while a job waits on an autoscaler --------------------------------------------------------------------------


def pending_line(status: dict[str, Any]) -> str | None:
    """What the cluster's autoscaler reports the job waits for, as one line; None when nothing is pending."""
    demand = (status.get("load_metrics_report") or {}).get("resource_demand") or []
    report = status.get("autoscaler_report") or {}
    launching = {**(report.get("pending_launches") or {})}
    for node in report.get("pending_nodes") or []:
        if isinstance(node, (list, tuple)) and len(node) >= 2:
            launching[node[1]] = launching.get(node[1], 0) + 1
    if not demand:
        return None
    wanted = "; ".join(f"{count} × {{{', '.join(f'{k}: {v:g}' for k, v in sorted(bundle.items()))}}}"
                       for bundle, count in demand)
    line = f"waiting for the cluster: {wanted} pending"
    if launching:
        line += "; autoscaler launching " + ", ".join(f"{k} × {v}" for k, v in sorted(launching.items()))
    else:
        line += "; no node is being launched for it (check the autoscaler's node types: `ray status`)"
    return line


# -- the model pool on an autoscaling cluster ---------------------------------------------------------------------


def pool_minimum(compute: ComputeConfig, autoscaler: str, items: int) -> int:
    """The model actor pool's minimum size for a run of `items` work items on a Ray whose `autoscaler` is as
    `ClusterView.autoscaler` says.

    On a Ray without an autoscaler it is `min_replicas`: Ray Data's actor autoscaler grows the pool while the
    resources for another replica are free. On a cluster whose autoscaler adds nodes, that policy cannot grow the
    pool onto nodes that do not exist yet: Ray Data sizes it against the resources its dataset has reserved among
    the nodes alive now (its autoscaling coordinator's reservation), so with no free GPU a scale-up is refused
    ("exceeded resource limits"), and a replica still pending for its node is scaled back down as over the
    allocation, so its node, once launched, finds no replica and is removed idle. There the pool asks for every
    replica the work can use at once, as its minimum: `min(max_replicas, items)`, never below `min_replicas`. The
    pending replicas are the autoscaler's demand, so it launches their nodes together; Ray Data never scales a pool
    below its minimum for budget; and once its input is consumed it releases the idle replicas anyway, so their
    nodes can go."""
    low, high = int(compute.min_replicas), int(compute.max_replicas)
    if autoscaler == "none":
        return low
    return max(low, min(high, items))


@dataclasses.dataclass
class PoolReport:
    """The model pool while a job runs, sampled by the driver (`cluster_view.watch_pool`): replicas running (alive),
    wanted (alive or waiting to be placed), the configured maximum, node launches the autoscaler has pending, and
    for how long the pool ran fewer than `max_replicas` replicas while at least that many items were queued."""

    max_replicas: int
    running: int = 0
    wanted: int = 0
    pending_nodes: int = 0
    peak_running: int = 0
    peak_pending_nodes: int = 0
    queued_s: float = 0.0
    below_max_s: float = 0.0
    samples: int = 0
    _last: float | None = None
    _queued: bool = False

    def note(self, now: float, running: int, wanted: int, pending_nodes: int, queued_items: int) -> None:
        """A sample at monotonic time `now`; the time since the previous sample counts for the previous state."""
        if self._last is not None and self.samples:
            span = max(now - self._last, 0.0)
            if self._queued:
                self.queued_s += span
                if self.running < self.max_replicas:
                    self.below_max_s += span
        self._last, self.samples = now, self.samples + 1
        self.running, self.wanted, self.pending_nodes = running, wanted, pending_nodes
        self.peak_running = max(self.peak_running, running)
        self.peak_pending_nodes = max(self.peak_pending_nodes, pending_nodes)
        self._queued = queued_items >= self.max_replicas

    def short(self) -> str:
        """For the progress line: `replicas 1 running / 2 wanted / 2 max · 1 node launching`."""
        text = f"replicas {self.running} running / {self.wanted} wanted / {self.max_replicas} max"
        if self.pending_nodes:
            text += f" · {_count(self.pending_nodes, 'node')} launching"
        return text

    def line(self) -> str:
        """For the summary: the peak, and how long the pool was below `max_replicas` while work was queued."""
        return (f"replicas: up to {self.peak_running} of max {self.max_replicas} running; below max_replicas for "
                f"{self.below_max_s:.1f}s of {self.queued_s:.1f}s with at least {self.max_replicas} item(s) queued"
                + (f"; up to {_count(self.peak_pending_nodes, 'node')} launching at once" if self.peak_pending_nodes
                   else ""))

    def to_json(self) -> dict[str, Any]:
        return {"max_replicas": self.max_replicas, "peak_running": self.peak_running,
                "peak_pending_nodes": self.peak_pending_nodes,
                "below_max_while_queued_s": round(self.below_max_s, 3), "queued_s": round(self.queued_s, 3),
                "samples": self.samples}
