"""A Ray cluster with Ray's own autoscaler on this machine: its fake multi-node provider launches every node as
local processes on 127.0.0.1, so the autoscaler's real decisions (launch on demand, idle termination, replacing a
lost node) run in tests.

The head is `RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config=…` in a session of its own, with a
short temp dir of its own (Ray's socket paths must fit), token auth on (`RAY_AUTH_MODE=token`, a fresh
`RAY_AUTH_TOKEN` in its environment and in every job process's: the autoscaler's monitor starts each node from
that environment), the multi-node switch off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: nodes take 127.0.0.1 instead
of asking the network for a routable address). The provider starts a node in its own process (the head's
monitor), so every node of the cluster is a process of the head's session: stopping the cluster signals that
session only, never `ray stop`.

A node is taken away mid-job by the autoscaler itself (`set_gpu_nodes_max` below the nodes running: it terminates
the surplus through the provider, which kills every process of the node, as a cloud reclaims a preempted instance),
and the limit put back lets it launch a replacement for the demand left. (A node whose processes are merely killed
stays listed by the fake provider, which no cloud does for a reclaimed instance; the v1 autoscaler then keeps it,
as a node that fits the restarting replica's demand, until that demand is gone.)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from support.sockets import free_ports, stop_session

GPU_NODE_TYPE = "gpu_worker"
HEAD_NODE_TYPE = "ray.head.default"
HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                "health_check_initial_delay_ms": 0}
NODE_OBJECT_STORE = 200 * 2**20


def autoscaling_config(gcs_port: int, head_cpus: float, gpu_nodes_max: int,
                       idle_timeout_s: float) -> dict[str, Any]:
    """The cluster launcher config the head's autoscaler reads: a head of `head_cpus` CPUs, no GPU, and one worker
    type, `gpu_worker` (1 CPU + 1 GPU), min 0 .. `gpu_nodes_max`, removed after `idle_timeout_s` idle. (Ray's wheel
    lacks the example `fake_multi_node/example.yaml`, so it is written here.)"""
    return {
        "cluster_name": "embedrank-test", "max_workers": gpu_nodes_max, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        # launch_multiple: a launch of n nodes starts n (the fake provider's default starts one whatever n is)
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "launch_multiple": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            GPU_NODE_TYPE: {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": NODE_OBJECT_STORE},
                            "node_config": {}, "min_workers": 0, "max_workers": gpu_nodes_max},
        },
        "head_node_type": HEAD_NODE_TYPE, "auth": {"ssh_user": "ray"}, "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class AutoscalingCluster:
    """The head (started at once) and the autoscaler in it; worker nodes come and go as the autoscaler decides."""

    def __init__(self, head_cpus: float = 1, gpu_nodes_max: int = 2, idle_timeout_s: float = 15.0):
        self.temp_dir = tempfile.mkdtemp(prefix="er-as-", dir="/tmp")  # short: Ray's socket paths must fit
        self.gcs_port, client, metrics, agent, runtime_env, dashboard = free_ports(6)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.token = secrets.token_hex(32)
        self.config_path = config = os.path.join(self.temp_dir, "autoscaling.json")
        self.config = autoscaling_config(self.gcs_port, head_cpus, gpu_nodes_max, idle_timeout_s)
        self._write_config()
        self.env = self.client_env()
        self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.log = open(os.path.join(self.temp_dir, "head.log"), "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
             f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
             f"--dashboard-agent-listen-port={agent}", f"--runtime-env-agent-port={runtime_env}",
             f"--num-cpus={head_cpus:g}", "--num-gpus=0", f"--object-store-memory={NODE_OBJECT_STORE}",
             f"--temp-dir={self.temp_dir}", f"--autoscaling-config={config}",
             f"--system-config={json.dumps(HEALTH_CHECK)}", "--disable-usage-stats"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def _write_config(self) -> None:
        with open(self.config_path + ".new", "w", encoding="utf-8") as fh:
            json.dump(self.config, fh)
        os.replace(self.config_path + ".new", self.config_path)

    def set_gpu_nodes_max(self, count: int) -> None:
        """Change `gpu_worker`'s max_workers in the config the autoscaler re-reads every update: lowered below the
        nodes running, the autoscaler itself terminates the surplus (`max_workers_per_type`), through the provider,
        as a cloud takes a preempted instance away."""
        self.config["available_node_types"][GPU_NODE_TYPE]["max_workers"] = count
        self.config["max_workers"] = count
        self._write_config()

    def wait_ready(self, timeout_s: float = 150) -> None:
        """Until the autoscaler reports the head (fails if the head exits: on an overloaded machine Ray gives a
        raylet 30 s to register and then gives up)."""
        deadline = time.monotonic() + timeout_s
        while HEAD_NODE_TYPE not in self.status():
            assert self.proc.poll() is None, f"the head exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"the head was not up after {timeout_s}s:\n{self.tail()}"
            time.sleep(2)

    def client_env(self) -> dict[str, str]:
        """The environment of any process that talks to this cluster (a job, a `ray` command): this one's without
        other Rays' addresses, token auth on with this cluster's token, the multi-node switch off."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        return env

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def monitor_log(self) -> str:
        path = os.path.join(self.temp_dir, "session_latest", "logs", "monitor.log")
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def status(self) -> str:
        """`ray status` of this cluster (the autoscaler's view: nodes, pending launches, demand)."""
        done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "status",
                               f"--address={self.address}"], env=self.client_env(), capture_output=True,
                              text=True, timeout=60)
        return done.stdout + done.stderr

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to every process of the head's session (every node of this cluster); the temp dir
        removed."""
        stop_session(self.proc)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
