"""Keeping Ray quiet on the driver's terminal: unless `--verbose`, only embedrank's own lines and real warnings and
errors reach it.

Ray's logs stay in its session's log directory (printed at start): its loggers print errors only, worker output
is not forwarded (`ensure_ray`'s `log_to_driver=False`; errors the raylet reports still are), Ray Data's console
and Ray's Python warnings show errors only (`quiet_ray_warnings`), Ray's notice that token authentication is on
is dropped, and (in the `embedrank` command only) the info/warning/error lines that Ray's C++ core writes to the
driver's stderr besides its log file (e.g. a `core_worker.cc` error about constructor arguments for every actor
pool) are filtered out of file descriptor 2. A module of its own because none of this changes what a job does:
it is output plumbing, apart from starting Ray and running work on it (`ray_runtime`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable

from pipelines.driver_session import at_session_end, in_session, verbose


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_NATIVE_LOG = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] ")
_undo_stderr: list[Callable[[], None]] = []
"""The undo of the native stderr filter while one is installed (at most one)."""


def _filter_native_stderr() -> Callable[[], None] | None:
    """Route file descriptor 2 through a thread that drops the log lines of Ray's C++ core (they are in its log
    file too; fatal ones pass), while Python's own stderr keeps the original descriptor. Only for a process's
    real stderr (never under a test's capture); returns the undo."""
    try:
        if sys.stderr is not sys.__stderr__ or sys.stderr.fileno() != 2:
            return None
    except (AttributeError, ValueError, OSError):
        return None
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    python_stderr = open(original, "w", buffering=1, encoding=sys.__stderr__.encoding or "utf-8",  # noqa: SIM115
                         errors="backslashreplace", closefd=False)
    sys.stderr = python_stderr
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with open(read_end, "rb") as native:
            for line in native:
                if not _NATIVE_LOG.match(line):
                    with contextlib.suppress(OSError):
                        os.write(original, line)

    thread = threading.Thread(target=pump, name="embedrank-stderr", daemon=True)
    thread.start()

    def undo() -> None:
        with contextlib.suppress(ValueError, OSError):
            python_stderr.flush()
        os.dup2(original, 2)  # closes the pipe's write end: the pump drains it and ends
        thread.join(timeout=2.0)
        sys.stderr = sys.__stderr__

    return undo


def _restore_native_stderr() -> None:
    """At the end of a session: the driver's stderr as it was (a no-op when it was never filtered)."""
    while _undo_stderr:
        _undo_stderr.pop()()


at_session_end(_restore_native_stderr)


def _add_filter_once(target: logging.Filterer, *starts: str) -> None:
    if not any(isinstance(f, _DropMessages) and f.starts == starts for f in target.filters):
        target.addFilter(_DropMessages(*starts))


def quiet_ray_logs() -> None:
    """Before `ray.init`: Ray's notice that token authentication is on dropped, and in the `embedrank` command
    the log lines of Ray's C++ core filtered out of the driver's stderr."""
    _add_filter_once(logging.getLogger("ray._private.authentication.authentication_token_setup"),
                     "Token authentication is enabled for this Ray cluster")
    if in_session() and not _undo_stderr:
        undo = _filter_native_stderr()
        if undo is not None:
            _undo_stderr.append(undo)


def quiet_ray_data() -> None:
    """Our own progress lines replace Ray Data's progress bars; its console shows warnings and errors only (all
    of it with `--verbose`; its log file in Ray's log directory keeps everything)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if verbose():
        return
    quiet_ray_warnings()
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.ERROR)


def quiet_ray_warnings() -> None:
    """Without `--verbose` no Ray warning reaches the terminal (e.g. Ray Data's "Specifying both num_cpus and
    num_gpus for map tasks is experimental" on every GPU job): Ray Data's console handler and Ray's own logger
    show errors only, and Python warnings raised in Ray's modules are ignored. Ray's log files keep them all."""
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    logging.getLogger("ray").setLevel(logging.ERROR)
