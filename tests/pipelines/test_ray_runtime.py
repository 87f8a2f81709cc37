"""The embedded default Ray: it listens on loopback only, and only embedrank's own lines reach the terminal."""

import os
import subprocess
import sys

import pytest
from support.sockets import descendant_pids, listening_sockets

pytestmark = pytest.mark.integration

QUIET_SCRIPT = """
from pipelines.driver_session import driver_session
from pipelines.ray_quiet import quiet_ray_data
from pipelines.ray_runtime import ensure_ray
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
    # what every GPU job made Ray Data say (Ray's own code, through its own logger), and a Python warning of Ray's
    from ray.data._internal.execution.operators.map_operator import _canonicalize_ray_remote_args
    _canonicalize_ray_remote_args({{"num_cpus": 1, "num_gpus": 1}})
    import warnings
    warnings.warn_explicit("a warning of Ray's", UserWarning, "dataset.py", 1, module="ray.data.dataset")
    print("READY", flush=True)
    import sys; sys.stdin.read()  # the test looks at Ray's listeners meanwhile
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_embedded_ray_listens_on_loopback_and_only_our_lines_reach_the_terminal_unless_verbose(verbose, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # Ray's defaults, token auth on
    lines: list[str] = []
    with open(tmp_path / "stderr", "w+") as err_file:  # a file, not a pipe: nothing blocks while stdout is read
        proc = subprocess.Popen([sys.executable, "-c", QUIET_SCRIPT.format(verbose=verbose)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
        try:
            while proc.poll() is None and (not lines or lines[-1] != "READY"):
                lines.append(proc.stdout.readline().rstrip("\n"))
            assert lines and lines[-1] == "READY", (lines, (tmp_path / "stderr").read_text())
            found = listening_sockets(descendant_pids(proc.pid))
            assert len(found) >= 3, found  # GCS, raylet, object manager at least
            exposed = [f for f in found if f.host not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
            assert not exposed, exposed
        finally:
            try:
                rest, _ = proc.communicate(timeout=120)  # closes stdin: the script ends
            except subprocess.TimeoutExpired:
                proc.kill()
                rest, _ = proc.communicate()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr
    stdout = "\n".join(lines) + "\n" + rest
    assert "28" in stdout.splitlines()
    started = [line for line in stderr.splitlines() if line.startswith("ray: started a local Ray (its logs: ")]
    assert len(started) == 1, stderr
    if verbose:
        # Ray's and Ray Data's own lines come back (workers' output too, but that arrives asynchronously)
        assert "Started a local Ray instance" in stderr and "execution finished" in stderr
        assert "Specifying both num_cpus and num_gpus for map tasks is experimental" in stderr
        assert "a warning of Ray's" in stderr
        assert "--verbose shows them here" not in started[0]
    else:
        # no token notice, core_worker.cc, Ray Data lines, Ray Data's warning of every GPU job, Ray's warnings
        assert stderr.splitlines() == started, stderr
        assert started[0].endswith("/logs; --verbose shows them here)") and "replica output" not in stdout


def test_a_killed_drivers_resource_request_expires_in_seconds_not_minutes():
    """A job's driver asks Ray Data's coordinator to expire its resource request 30 s after the last renewal
    (Ray's default is 180 s): a killed driver's request must not hold the rerun back for minutes."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S"}
    probe = ("import pipelines.lifecycle\n"
             "from ray.data._internal.cluster_autoscaler.default_cluster_autoscaler_v2 import "
             "DefaultClusterAutoscalerV2 as D\nprint(D.AUTOSCALING_REQUEST_EXPIRE_TIME_S)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "30", out.stderr[-2000:]
