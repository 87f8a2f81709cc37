"""One writer per output: a lock object with an owner and a heartbeat.

A second job finds a fresh lock and is refused, naming the owner. A lock whose
owner is gone is taken over with a message: on the same host that is known at
once (its process no longer exists); elsewhere, when its heartbeat is older than
`stale_after_s` (killed driver, lost node). Object stores have no
atomic create-if-absent here, so after writing its lock a job reads it back and
proceeds only if it is still the owner.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, TextIO

from common.errors import OutputError
from pipelines.storage import Storage

LOCK_FILE = "_lock.json"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live process from a reused pid), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_gone(held: dict[str, Any]) -> bool:
    """Whether the lock's owner is known to be dead: only decidable for a process on this host."""
    if held.get("host") != socket.gethostname() or "pid" not in held:
        return False
    start = _process_start(int(held["pid"]))
    return start is None or start != held.get("pid_start")


class OutputLock:
    def __init__(self, storage: Storage, stale_after_s: float, stream: TextIO | None = None):
        self.storage = storage
        self.stale_after_s = stale_after_s
        self.stream = stream or sys.stderr
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host} pid {self.pid}"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(LOCK_FILE))
        except FileNotFoundError:
            return None

    def _write(self) -> None:
        self.storage.write_bytes(LOCK_FILE, json.dumps({
            "token": self.token, "owner": self.owner, "host": self.host, "pid": self.pid,
            "pid_start": _process_start(self.pid), "started": self.started, "heartbeat": time.time(),
        }).encode())

    def acquire(self) -> "OutputLock":
        held = self._read()
        if held is not None:
            age = time.time() - float(held.get("heartbeat", 0))
            gone = owner_gone(held)
            if age < self.stale_after_s and not gone:
                raise OutputError(
                    f"{self.storage.url} is being written by another job ({held.get('owner')}, last heartbeat "
                    f"{age:.0f}s ago); refusing to run a second writer. If that job is gone, its lock goes "
                    f"stale after {self.stale_after_s:.0f}s (run.lock_stale_s)"
                )
            why = "its process is gone" if gone else f"last heartbeat {age:.0f}s ago"
            print(f"lock: taking over a stale lock of {held.get('owner')} ({why})", file=self.stream, flush=True)
        self._write()
        time.sleep(0.05)
        now_held = self._read()
        if now_held is None or now_held.get("token") != self.token:
            raise OutputError(f"{self.storage.url}: another job took the lock at the same moment; refusing")
        self._thread = threading.Thread(target=self._beat, name="embedrank-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(max(self.stale_after_s / 5, 0.05)):
            try:
                self._write()
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the job
                print(f"lock: heartbeat failed ({type(exc).__name__}); will retry", file=self.stream, flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held is not None and held.get("token") == self.token:
            self.storage.delete([LOCK_FILE])

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
