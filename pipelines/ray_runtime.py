"""Starting or joining Ray for a job: embedded local Ray by default, a cluster when an address is given."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); with neither, start a private local Ray bound to loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


def quiet_ray_data() -> None:
    """Our own progress lines replace Ray Data's progress bars."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
