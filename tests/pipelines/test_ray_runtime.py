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
