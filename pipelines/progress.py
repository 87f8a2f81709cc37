"""Progress lines while a job runs and the summary at its end."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts committed work and prints a rate/ETA line at most every `interval` seconds."""

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

    def update(self, commit: dict[str, Any]) -> None:
        self.items += 1
        self.rows += commit["rows"]
        self.rejected += commit["rejected"]
        self.tokens += commit["tokens"]
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.print_line()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def print_line(self) -> None:
        done = self.done_items + self.items
        elapsed = max(self.elapsed, 1e-9)
        rows_s = (self.rows + self.rejected) / elapsed
        remaining_rows = max(self.known_rows - self.rows - self.rejected, 0)
        eta = format_duration(remaining_rows / rows_s) if rows_s > 0 and self.known_rows else "?"
        pct = 100.0 * done / self.total_items if self.total_items else 100.0
        print(f"[{self.label}] items {done}/{self.total_items} ({pct:.0f}%) · rows {self.rows:,} "
              f"(+{self.rejected:,} rejected) · {rows_s:,.1f} rows/s · {self.tokens / elapsed:,.0f} tokens/s "
              f"· ETA {eta}", file=self.stream, flush=True)

    def summary(self) -> dict[str, Any]:
        return {"items_processed": self.items, "items_skipped": self.done_items, "items_total": self.total_items,
                "rows": self.rows, "rejected": self.rejected, "tokens": self.tokens,
                "wall_s": round(self.elapsed, 3)}
