"""One writer per output: a lock object with an owner and a heartbeat.

A second job finds a fresh lock and is refused, naming the owner. A lock whose
heartbeat is older than `stale_after_s` belongs to a job that is gone (killed
driver, lost node) and is taken over with a message. Object stores have no
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

from pipelines.errors import OutputError
from pipelines.storage import Storage

LOCK_FILE = "_lock.json"


class OutputLock:
    def __init__(self, storage: Storage, stale_after_s: float, stream: TextIO | None = None):
        self.storage = storage
        self.stale_after_s = stale_after_s
        self.stream = stream or sys.stderr
        self.token = uuid.uuid4().hex
        self.owner = f"{socket.gethostname()} pid {os.getpid()}"
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
            "token": self.token, "owner": self.owner, "started": self.started, "heartbeat": time.time(),
        }).encode())

    def acquire(self) -> "OutputLock":
        held = self._read()
        if held is not None:
            age = time.time() - float(held.get("heartbeat", 0))
            if age < self.stale_after_s:
                raise OutputError(
                    f"{self.storage.url} is being written by another job ({held.get('owner')}, last heartbeat "
                    f"{age:.0f}s ago); refusing to run a second writer. If that job is gone, its lock goes "
                    f"stale after {self.stale_after_s:.0f}s (run.lock_stale_s)"
                )
            print(f"lock: taking over a stale lock of {held.get('owner')} (last heartbeat {age:.0f}s ago)",
                  file=self.stream, flush=True)
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
