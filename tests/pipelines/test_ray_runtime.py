"""The embedded default Ray listens on loopback only."""

import os
import subprocess
import sys

import pytest
from support.sockets import descendant_pids, listening_sockets

pytestmark = pytest.mark.integration

SCRIPT = """
from pipelines.ray_runtime import ensure_ray
ensure_ray()
print("READY", flush=True)
import sys; sys.stdin.read()
"""


def test_embedded_ray_binds_every_listener_to_loopback():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "READY"
        found = listening_sockets(descendant_pids(proc.pid))
        assert len(found) >= 3, found
        exposed = [f for f in found if f.host not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
        assert not exposed, exposed
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


QUIET_SCRIPT = """
from pipelines.ray_runtime import driver_session, ensure_ray, quiet_ray_data
with driver_session(verbose={verbose}):
    ensure_ray()
    quiet_ray_data()
    import ray.data

    class Loud:
        def __call__(self, batch):
            print("replica output", flush=True)
            return batch

    pool = ray.data.ActorPoolStrategy(size=1)  # Ray's core logs an error about every such pool's constructor
    ds = ray.data.range(8, override_num_blocks=2).map_batches(Loud, compute=pool, num_cpus=0.5)
    print(sum(r["id"] for r in ds.iter_rows()), flush=True)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_only_our_own_lines_reach_the_terminal_unless_verbose(verbose):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # Ray's defaults, token auth on
    proc = subprocess.run([sys.executable, "-c", QUIET_SCRIPT.format(verbose=verbose)], capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "28" in proc.stdout.splitlines()
    started = [line for line in proc.stderr.splitlines() if line.startswith("ray: started a local Ray (its logs: ")]
    assert len(started) == 1, proc.stderr
    if verbose:
        # Ray's and Ray Data's own lines come back (workers' output too, but that arrives asynchronously)
        assert "Started a local Ray instance" in proc.stderr and "execution finished" in proc.stderr
        assert "--verbose shows them here" not in started[0]
    else:
        assert proc.stderr.splitlines() == started, proc.stderr  # no token notice, core_worker.cc, Ray Data lines
        assert started[0].endswith("/logs; --verbose shows them here)") and "replica output" not in proc.stdout
