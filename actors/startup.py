"""A replica's start-up, timed in its own process and handed back on its first output batch.

The job's summary prints where its first minute went (`pipelines.progress.Startup`): the driver times its own
phases; what happened inside a replica process only the replica can time. It reports that once, as the column
`_replica_startup` (`common.columns.REPLICA_STARTUP`) on the rows of its first output batch (null on every
later batch); the write task copies the reports it sees into its piece records, and the driver reads them from
there. Why that channel: it is the data path that already carries everything a replica produces to the driver,
so it needs no Ray API in `actors/` (which never imports ray), no dashboard or state API (the embedded local Ray
runs without the dashboard, and Ray's task events time the actor's creation task as a whole, not imports apart
from the model load), and no side channel to keep in step; the cost is one null string per row. A report is
one small JSON object:

- `imports_s`: the seconds this process spent importing the replica's module (torch, transformers and ours;
  measured once per process, from this module's import, which `actors.embedder` does first, to the end of
  its imports);
- `load_s`: the replica's constructor (model files fetched or checked, tokenizer and model loaded);
- `ready_at`, `first_batch_at`: wall-clock times (`time.time()`, seconds since the epoch) when the constructor
  returned and when the first batch reached the replica; the driver subtracts its job's start from them. On a
  cluster that spans machines they carry the machines' clock difference (NTP keeps it to milliseconds);
- `host`, `pid`: which replica it was.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pyarrow as pa

_IMPORTS_BEGAN = time.perf_counter()
"""When this process began importing a replica module (the first thing `actors.embedder` imports)."""
_imports_s: float | None = None


def imports_done() -> float:
    """Called at the end of a replica module's imports: the seconds since they began (the first call's figure)."""
    global _imports_s
    if _imports_s is None:
        _imports_s = time.perf_counter() - _IMPORTS_BEGAN
    return _imports_s


class StartupReport:
    """Made at the start of a replica's constructor; `ready()` at its end; `column()` on each output batch."""

    def __init__(self) -> None:
        self._constructing = time.perf_counter()
        self._ready_at: float | None = None
        self._load_s = 0.0
        self._first_batch_at: float | None = None
        self._sent = False

    def ready(self) -> None:
        self._load_s = time.perf_counter() - self._constructing
        self._ready_at = time.time()

    def arrived(self) -> None:
        """A batch reached the replica (called first thing in each call; only the first counts)."""
        if self._first_batch_at is None:
            self._first_batch_at = time.time()

    def to_json(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "imports_s": round(imports_done(), 3),
                "load_s": round(self._load_s, 3), "ready_at": self._ready_at, "first_batch_at": self._first_batch_at}

    def column(self, rows: int) -> pa.Array:
        """The report on every row of the first batch (so that it reaches the driver whichever of them are
        written first), nulls on every later one."""
        if self._sent:
            return pa.nulls(rows, pa.string())
        self._sent = True
        return pa.array([json.dumps(self.to_json(), sort_keys=True)] * rows, pa.string())
