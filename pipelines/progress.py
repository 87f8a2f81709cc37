"""Progress while a job runs and the summary at its end.

On a terminal the progress is one line redrawn in place (at most 5 times a second); elsewhere (cron, a file,
`ray job submit` logs) it is a plain line every `run.progress_interval_s`, on a timer as well as when items commit. Other lines printed while a bar is
drawn go through `emit`, which clears the bar first; `end_line` ends a bar before an error or stop message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from typing import Any, Iterator, Protocol, TextIO

from pipelines.periodic import every

REDRAW_S = 0.2
_open_bars: dict[int, TextIO] = {}
"""Streams whose last write is an unfinished bar line (by id)."""
_current: list[Progress] = []


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def end_line(stream: TextIO | None = None) -> None:
    """Finish a bar drawn on `stream` (every stream: None) so that the next line starts on a line of its own."""
    for key, open_stream in list(_open_bars.items()):
        if stream is None or open_stream is stream:
            del _open_bars[key]
            try:
                open_stream.write("\n")
                open_stream.flush()
            except (ValueError, OSError):
                pass


def emit(stream: TextIO, text: str) -> None:
    """Print a line of its own while a bar may be drawn on `stream` (the bar is redrawn by its next update)."""
    if id(stream) in _open_bars:
        del _open_bars[id(stream)]
        stream.write("\r\x1b[K")
    print(text, file=stream, flush=True)


class Counted(Protocol):
    """What progress counts of a committed item (an `output.records.ItemCommit` has these): progress reads the
    figures only, so it needs nothing from the output room."""

    rows: int
    rejected: int
    tokens: int


def current() -> Progress | None:
    """The progress of the items phase running (or last run) in this process: how far a stopped job got."""
    return _current[-1] if _current else None


def forget() -> None:
    """A new job starts in this process: no progress yet."""
    _current.clear()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts committed work and shows rate and ETA: a bar redrawn in place on a terminal, else a line at most
    every `interval` seconds."""

    def __init__(self, total_items: int, done_items: int, known_rows: int, interval: float,
                 stream: TextIO | None = None, label: str = "embed"):
        self.total_items = total_items
        self.done_items = done_items
        self.known_rows = known_rows
        self.interval = interval
        self.stream = stream or sys.stderr
        self.label = label
        self.items = self.rows = self.rejected = self.tokens = 0
        self.started = self._last = time.monotonic()
        self.bar = _is_tty(self.stream)
        self._lock = threading.Lock()
        self.pool: Any = None
        """The model pool while the pipeline runs (`resources.PoolReport`), shown at the end of the line."""
        _current[:] = [self]

    def update(self, commit: Counted) -> None:
        """One more item committed, with its rows, rejected rows and tokens."""
        with self._lock:
            self.items += 1
            self.rows += commit.rows
            self.rejected += commit.rejected
            self.tokens += commit.tokens
        self._show(REDRAW_S if self.bar else self.interval)

    def _show(self, min_gap: float) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < min_gap:
                return
            self._last = now
            if self.bar:
                self.stream.write(f"\r{self.line()}\x1b[K")
                self.stream.flush()
                _open_bars[id(self.stream)] = self.stream
            else:
                self.print_line()

    @contextlib.contextmanager
    def ticking(self) -> Iterator[None]:
        """While the items phase runs, the progress shows on a timer too, not only when an item commits: a line
        every `interval` (a bar redrawn every second), so a job whose items take long still says it is alive."""
        step = min(self.interval, 1.0)
        with every(step, lambda: self._show(step if self.bar else self.interval), "embedrank-progress"):
            yield

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def committed(self) -> int:
        """Items committed in all, earlier runs' included."""
        return self.done_items + self.items

    def line(self) -> str:
        done = self.committed
        elapsed = max(self.elapsed, 1e-9)
        rows_s = (self.rows + self.rejected) / elapsed
        remaining_rows = max(self.known_rows - self.rows - self.rejected, 0)
        eta = format_duration(remaining_rows / rows_s) if rows_s > 0 and self.known_rows else "?"
        if done >= self.total_items:
            eta = "0s"  # (a resumed run's rows count this run's only)
        pct = 100.0 * done / self.total_items if self.total_items else 100.0
        return (f"[{self.label}] items {done}/{self.total_items} ({pct:.0f}%) · rows {self.rows:,} "
                f"(+{self.rejected:,} rejected) · {rows_s:,.1f} rows/s · {self.tokens / elapsed:,.0f} tokens/s "
                f"· ETA {eta}" + (f" · {self.pool.short()}" if self.pool is not None and self.pool.samples else ""))

    def print_line(self) -> None:
        """The progress as a line of its own (on a terminal: the bar, finished)."""
        if id(self.stream) in _open_bars:
            del _open_bars[id(self.stream)]
            self.stream.write("\r")
        print(f"{self.line()}\x1b[K" if self.bar else self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """The items phase is over: a bar drawn on a terminal is cleared (the summary prints the last figures)."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if id(self.stream) in _open_bars:
            del _open_bars[id(self.stream)]
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def summary(self) -> dict[str, Any]:
        return {"items_processed": self.items, "items_skipped": self.done_items, "items_total": self.total_items,
                "rows": self.rows, "rejected": self.rejected, "tokens": self.tokens,
                "wall_s": round(self.elapsed, 3)}


@dataclasses.dataclass
class Startup:
    """Where a run's first minute goes, as marks in seconds since the job's start (`run_job` entered).

    The driver times its own phases: Ray (`ray_runtime.last_ray_start`: started here, joined, or already up when
    the job began) and the first item committed from the pipeline. A replica times its own start in its process
    (`actors.startup`: its imports, its model load, when it was ready and when its first batch arrived) and the
    report reaches the driver in the piece records of its first rows. Times are wall-clock (`time.time()`), so
    that the replica's and the driver's marks share one clock on a machine.
    """

    started: float = dataclasses.field(default_factory=time.time)
    ray: str = "connected"
    """`started` (a local Ray, by this job), `joined` (a cluster, by this job) or `connected` (up before it)."""
    ray_up: float | None = None
    ray_start_s: float = 0.0
    replicas: dict[tuple[str, int], dict[str, Any]] = dataclasses.field(default_factory=dict)
    first_item: float | None = None

    def note_ray(self, how: str, began: float, ready: float) -> None:
        if began >= self.started:
            self.ray, self.ray_up, self.ray_start_s = how, ready, ready - began

    def note_replicas(self, reports: Any) -> None:
        for r in reports:
            self.replicas.setdefault((str(r.get("host")), int(r.get("pid") or 0)), r)

    def note_item(self) -> None:
        if self.first_item is None:
            self.first_item = time.time()

    def to_json(self) -> dict[str, Any]:
        """The job's start (`started_at`, seconds since the epoch: places the marks on another clock of this
        machine, e.g. a benchmark's launch time) and the phases (seconds since the job's start, except the
        replica's `imports_s`/`load_s`, durations); the replica's are those of the first replica ready (None where
        no replica reported, e.g. nothing to do)."""
        def since(t: float | None) -> float | None:
            return None if t is None else round(max(t - self.started, 0.0), 3)

        ready = [r for r in self.replicas.values() if r.get("ready_at")]
        first = min(ready, key=lambda r: r["ready_at"]) if ready else {}
        return {"started_at": round(self.started, 3), "ray": self.ray,
                "ray_s": since(self.ray_up) if self.ray_up is not None else 0.0,
                "ray_start_s": round(self.ray_start_s, 3), "replica_ready_s": since(first.get("ready_at")),
                "replica_imports_s": first.get("imports_s"), "replica_load_s": first.get("load_s"),
                "replica_first_batch_s": since(first.get("first_batch_at")), "replicas_reported": len(ready),
                "first_item_s": since(self.first_item), "wall_s": since(time.time())}


def startup_line(phases: dict[str, Any]) -> str:
    """`start-up (since the job's start): Ray 6.8s (local, started in 6.6s) · replica ready 12.1s (imports 3.0s,
    model load 2.2s) · its first batch 12.6s · first item committed 14.0s · wall 28.9s`: marks since the job's start
    (`Startup.to_json`), durations in brackets."""
    ray = {"started": f"Ray {phases['ray_s']:.1f}s (local, started in {phases['ray_start_s']:.1f}s)",
           "joined": f"Ray {phases['ray_s']:.1f}s (joined in {phases['ray_start_s']:.1f}s)"}.get(
               phases["ray"], "Ray already up")
    parts = [ray]
    if phases.get("replica_ready_s") is not None:
        parts.append(f"replica ready {phases['replica_ready_s']:.1f}s (imports {phases['replica_imports_s']:.1f}s, "
                     f"model load {phases['replica_load_s']:.1f}s)")
    if phases.get("replica_first_batch_s") is not None:
        parts.append(f"its first batch {phases['replica_first_batch_s']:.1f}s")
    if phases.get("first_item_s") is not None:
        parts.append(f"first item committed {phases['first_item_s']:.1f}s")
    parts.append(f"wall {phases['wall_s']:.1f}s")
    return "start-up (since the job's start): " + " · ".join(parts)
