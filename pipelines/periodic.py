"""Run a function every so often on a daemon thread while a block of code runs (progress lines, cluster watchers)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def every(interval_s: float, fn: Callable[[], None], name: str, join_s: float = 2.0) -> Iterator[None]:
    """Call `fn` every `interval_s` (the first call one interval in) until the block ends; then stop the thread,
    waiting at most `join_s` for a call in progress."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            fn()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=join_s)
