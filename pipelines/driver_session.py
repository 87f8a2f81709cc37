"""The `embedrank` command's run of a job on the driver: how a stop signal ends it, whether Ray's output is shown,
and what is cleaned up on the way out.

Kept apart from the modules that start and quiet Ray so that the stop rules read in one place and need no Ray:
this module never imports it. The modules that start something a session must undo register the undo here
(`at_session_end`: `ray_runtime` shuts down a local Ray it started, `ray_quiet` restores the driver's stderr).

Stop: SIGINT and SIGTERM raise `Stopped` on the driver's thread. While the driver waits for the pipeline
(`stop_allowed`) that happens at once; while it commits (`stop_deferred`) it waits until the rows in hand are
committed, so that no item is left half-written (a second signal stops at once, a third exits without cleanup).
On the way out the running pipeline is force-stopped (the watchdog's stop: actors killed, tasks cancelled), the
lock released, and the session-end undos run (a local Ray this process started is shut down with every process
of it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pipelines.progress import forget


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM on the driver. A KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


@dataclasses.dataclass
class _Driver:
    verbose: bool = False
    session: bool = False
    """Inside `driver_session` (the `embedrank` command): Ray's native stderr may be filtered, signals stop."""
    signals: int = 0
    deferring: int = 0
    allowed: int = 0
    pending: Stopped | None = None
    previous_handlers: dict[int, Any] = dataclasses.field(default_factory=dict)
    at_end: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    """Undos run when a session ends, the last registered first (each a no-op when it has nothing to undo)."""


_driver = _Driver()


def verbose() -> bool:
    """Whether the running session shows Ray's own output (`--verbose`); False outside a session."""
    return _driver.verbose


def in_session() -> bool:
    """Whether this process runs a job inside `driver_session` (the `embedrank` command)."""
    return _driver.session


def at_session_end(undo: Callable[[], None]) -> None:
    """Run `undo` whenever a session ends (done, failed or stopped); registered once, by the module that may
    leave something to undo."""
    if undo not in _driver.at_end:
        _driver.at_end.append(undo)


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


def reinstall_stop_handlers() -> None:
    """In a session, take SIGINT and SIGTERM back (`ray.init` replaces SIGTERM's handler with its own)."""
    if _driver.session:
        _install_stop_handlers()


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


def _restore_handlers() -> None:
    for signum, handler in _driver.previous_handlers.items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signum, handler)
    _driver.previous_handlers.clear()


@contextlib.contextmanager
def driver_session(verbose: bool = False) -> Iterator[None]:
    """The `embedrank` command's run of a job: Ray's own output quiet unless `verbose`, SIGINT/SIGTERM stop the
    job (`Stopped`), and on the way out (done, failed or stopped) the registered undos run (a local Ray this
    process started is shut down with all its processes), then the previous signal handlers come back."""
    _driver.verbose, _driver.session, _driver.signals, _driver.pending = verbose, True, 0, None
    forget()
    _install_stop_handlers()
    try:
        yield
    finally:
        with contextlib.ExitStack() as undo:  # each runs even if one before it raised; the last pushed runs first
            undo.callback(setattr, _driver, "session", False)
            undo.callback(_restore_handlers)
            for step in _driver.at_end:
                undo.callback(step)
