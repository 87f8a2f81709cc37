"""Jobs run as their own processes, as a user runs them, joining the session's Ray as a driver joins a cluster.

A job process needs no Ray of its own (starting one costs seconds on 2 cores): it joins the session's
(`--set run.ray_address=…`). Failpoints that must fire inside Ray's workers reach them as the job's
runtime_env, exactly as `ray job submit --runtime-env-json` hands a runtime_env to the driver it starts
(Ray's job manager sets `RAY_JOB_CONFIG_JSON_ENV_VAR`; `ray.init` in the driver applies it to every worker
of that job, and to no other job's).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_process_env(driver_env: dict[str, str] | None = None,
                    worker_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job process: this one's without RAY_ADDRESS and EMBEDRANK_* settings, plus
    `driver_env` (the driver only) and `worker_env` (the driver and every Ray worker of its job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "EMBEDRANK_", JOB_CONFIG_VAR))}
    env.update(driver_env or {})
    if worker_env:
        env.update(worker_env)
        env[JOB_CONFIG_VAR] = json.dumps({"runtime_env": {"env_vars": dict(worker_env)}})
    return env


def job_summary(code: int, stdout: str) -> dict[str, Any] | None:
    """A job process's `--json` summary: its last JSON line (Ray may print lines of its own around it), None
    unless it exited 0."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith('{"')]
    return json.loads(lines[-1]) if code == 0 and lines else None


def wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> int:
    """The job process's exit code; killed (and reaped) if it is still running after `timeout_s`, so that a hung
    job fails its test instead of outliving it."""
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
