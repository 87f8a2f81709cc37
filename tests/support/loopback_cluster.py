"""A multi-node Ray cluster on this machine, every node on 127.0.0.1, for tests that lose a node.

`LoopbackCluster` is Ray's own multi-node test harness (`ray.cluster_utils.Cluster`) started without
connecting this process to it (a job joins it as its own driver process, by address), with Ray's
multi-node switch off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: no node asks the network for its routable
address) and each node pinned to 127.0.0.1. A node is lost for real with `kill`: SIGKILL to every process
the node started (its raylet, which holds the node's object store, and the agents under it); the node's
workers die with their raylet. The GCS marks the node dead after `HEALTH_CHECK` misses (about 2 s here,
15 s with Ray's defaults), as it does for a preempted spot instance.

The harness's process-wide side effects are undone or left out, because this process may also be a driver of
the pytest session's own Ray (`ray_local`, connected for the rest of the session) and other Rays may run on the
machine. Starting a node points this process's internal-KV client (Ray Data and `ray.util` use it) at the new
cluster's GCS and installs a SIGTERM handler: both are put back after each node starts. Left pointing there, the
session's driver would talk to this cluster, and 60 s after this cluster's GCS is gone Ray would end the whole
pytest process ("Failed to connect to GCS within 60 seconds"); for the same reason the nodes' and the harness's
own GCS clients are dropped at `shutdown`. The harness would also write the machine-wide
`/tmp/ray/ray_current_cluster` (what `ray.init(address="auto")` finds), and its `shutdown()` deletes that file
and resets the internal-KV client: neither is done here (nodes are removed one by one instead).

`inet_sockets` reads which TCP/UDP sockets a set of processes holds (listening, connected) from /proc, and
`off_loopback` says whether one listens anywhere but 127.0.0.1 or reaches off the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

from support.sockets import LISTEN, InetSocket, descendant_pids, start_time

LOOPBACK = "127.0.0.1"
# A lost node is marked dead after 4 missed checks 0.5 s apart (Ray's default: 5 × 3 s), so that the actors
# and tasks it held are restarted elsewhere within seconds.
HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                "health_check_initial_delay_ms": 0}


def environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


@contextlib.contextmanager
def _process_state_kept():
    """This process's internal-KV client and SIGTERM handler as they were before a node started here."""
    from ray.experimental import internal_kv

    kv = internal_kv.global_gcs_client, internal_kv._initialized
    # None: a handler not set from Python, which cannot be put back (signal.signal refuses None)
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        internal_kv.global_gcs_client, internal_kv._initialized = kv
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


class LoopbackCluster:
    """A head node with `head_cpus` CPUs, and worker nodes added later, all on 127.0.0.1, in a temp dir of their
    own (short: Ray's socket paths must fit). Token auth is off (`RAY_AUTH_MODE=disabled`, tests only), set in
    this process's environment as `ray_local` sets it, so the nodes and the jobs started from here share it."""

    def __init__(self, head_cpus: float = 0, system_config: dict[str, Any] | None = None):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes started from here
        os.environ["RAY_AUTH_MODE"] = "disabled"
        import pytest
        import ray._private.utils
        from ray.cluster_utils import Cluster

        self.temp_dir = tempfile.mkdtemp(prefix="er-nodes-", dir="/tmp")
        self._node_args = {"node_ip_address": LOOPBACK, "temp_dir": self.temp_dir}
        with pytest.MonkeyPatch.context() as mp, _process_state_kept():
            mp.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
            self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
                "num_cpus": head_cpus, "include_dashboard": False, "_system_config": {**HEALTH_CHECK,
                                                                                       **(system_config or {})},
                **self._node_args})
        self.address = self.cluster.address
        self._started = [self.cluster.head_node]

    def add_worker(self, num_cpus: float):
        with _process_state_kept():
            node = self.cluster.add_node(num_cpus=num_cpus, **self._node_args)
        self._started.append(node)
        return node

    @property
    def workers(self) -> list:
        return list(self.cluster.worker_nodes)

    def node_pids(self, node) -> dict[int, str | None]:
        """Every live process of `node` (pid → start time): what it started (raylet, GCS, monitors) and below
        them (agents, workers)."""
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
        return {pid: start_time(pid) for root in roots for pid in descendant_pids(root) if start_time(pid)}

    def pids(self) -> dict[int, str | None]:
        return {pid: t for node in self.cluster.list_all_nodes() for pid, t in self.node_pids(node).items()}

    def kill(self, node) -> None:
        """SIGKILL every process `node` started (raylet and object store, agents), as a lost machine."""
        self.cluster.remove_node(node, allow_graceful=False)

    def remove(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=True)

    def nodes(self) -> list[dict[str, Any]]:
        """The GCS's node table: NodeID, Alive, NodeManagerAddress, Resources, …"""
        return self.cluster.global_state.node_table()

    def node_alive(self, node) -> bool:
        return any(n["Alive"] for n in self.nodes() if n["NodeID"] == node.node_id)

    def wait_dead(self, node, timeout_s: float = 30) -> float:
        """Seconds until the GCS marks `node` dead; fails after `timeout_s`."""
        started = time.monotonic()
        while self.node_alive(node):
            assert time.monotonic() - started < timeout_s, f"node {node.node_id} still alive after {timeout_s}s"
            time.sleep(0.1)
        return time.monotonic() - started

    def actors(self) -> dict[str, dict[str, Any]]:
        """The GCS's actor table: actor id → ActorClassName, State, Address.NodeID, NumRestarts, …"""
        return self.cluster.global_state.actor_table(None)

    def shutdown(self) -> None:
        """Every node removed (workers, then the head), every GCS client of this cluster in this process dropped,
        its temp dir deleted; nothing else touched."""
        try:
            for node in self.workers:
                with contextlib.suppress(Exception):
                    self.cluster.remove_node(node, allow_graceful=False)
            if self.cluster.head_node is not None:
                self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)
        finally:
            for node in self._started:
                node._gcs_client = None
            self.cluster.global_state.disconnect()
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def v4(address: tuple[str, int]) -> tuple[str, int]:
    """An IPv4-mapped IPv6 address (how a tcp6 socket shows 127.0.0.1) as plain IPv4."""
    return address[0].removeprefix("::ffff:"), address[1]


def off_loopback(sock: InetSocket) -> bool:
    """Whether `sock` listens (a TCP listener, an unconnected bound UDP socket) anywhere but 127.0.0.1, or is bound
    or connected to an address off loopback. An end that is not bound or connected reads port 0. (A connection
    to ::1 is on loopback too: Ray Data probes Prometheus at localhost:9090, which may resolve to ::1.)"""
    local, remote = v4(sock.local), v4(sock.remote)
    listening = sock.state == LISTEN if sock.proto.startswith("tcp") else remote[1] == 0
    if listening:
        return local[0] != LOOPBACK
    return any(port and not ipaddress.ip_address(host).is_loopback for host, port in (local, remote))
