"""The driver's commit loop: the single committer, as Spark's driver commits tasks.

Write tasks report pieces; an item commits as soon as a subset of its reported pieces tiles its rows exactly
(retries and re-executed tasks may report duplicate or overlapping pieces, see `tiling`). An item whose tiling has
several pieces that fit one file is merged first (`merge`), off the driver's thread, and commits when its merge
returns: the commit record names the merged files.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from common import failpoints
from common.errors import OutputError
from pipelines.input.plan import WorkItem
from pipelines.output.merge import MergeStats, merge_item, needs_merge
from pipelines.output.records import BadFile, ItemCommit, Piece
from pipelines.output.root import OutputRoot
from pipelines.output.tiling import find_tiling
from pipelines.watchdog import PipelineStalled

MERGES_IN_FLIGHT = 4
"""Merges running at once (each is one cluster task holding one item's rows)."""

Merge = Callable[[list[Piece]], list[Piece]]


@dataclasses.dataclass
class _ItemState:
    item: WorkItem
    pieces: list[Piece] = dataclasses.field(default_factory=list)
    seen: set[tuple] = dataclasses.field(default_factory=set)
    rows: int | None = None
    merging: bool = False


class Committer:
    """Collects piece records per item and commits an item as soon as some of its pieces tile it.

    An item's state is dropped when it commits, so memory follows the items in flight, not the job.
    `target_file_bytes` (None: never merge) sizes merged files; `merge` runs a merge (default: `merge_item` here,
    in a thread; the lifecycle runs it as a cluster task)."""

    def __init__(self, root: OutputRoot, fp_id: str, items: list[WorkItem], target_file_bytes: float | None = None,
                 merge: Merge | None = None):
        self.root = root
        self.fp_id = fp_id
        self.pending: dict[str, _ItemState] = {
            i.item_id: _ItemState(i, rows=None if i.row_end is None else i.row_end - i.row_start) for i in items
        }
        self.target_file_bytes = target_file_bytes
        self._merge = merge or (lambda pieces: merge_item(root.storage, pieces, target_file_bytes, root.epoch))
        self._merges: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.merged = MergeStats()

    def commit_empty(self) -> list[ItemCommit]:
        """Items known to have zero rows commit at once: there is nothing to process."""
        empty = [s for s in self.pending.values() if s.rows == 0]
        return [self._commit(s, []) for s in empty]

    def commit_bad_files(self, write_marker: Callable[[WorkItem], Piece]) -> list[ItemCommit]:
        """Files rejected whole at planning commit at once with their `_rejects/` marker, and no rows."""
        bad = [s for s in self.pending.values() if s.item.bad_reason]
        for s in bad:
            s.rows = 0
        return [self._commit(s, [write_marker(s.item)]) for s in bad]

    def add(self, piece: Piece) -> list[ItemCommit]:
        """Take one piece record; returns the items committed now: this piece's, if it completed an item that
        needs no merge, and those whose merge finished meanwhile."""
        commits = self.merged_commits()
        state = self.pending.get(piece.item)
        if state is None or state.merging or piece.key in state.seen:
            return commits
        state.seen.add(piece.key)
        state.pieces.append(piece)
        if state.rows is None:
            state.rows = piece.item_rows
        start = state.item.row_start
        path = find_tiling([(p.start, p.end) for p in state.pieces], start, start + state.rows)
        if path is None:
            return commits
        tiling = [state.pieces[i] for i in path]
        if self.target_file_bytes is None or not needs_merge(tiling, self.target_file_bytes):
            return [*commits, self._commit(state, tiling)]
        state.merging = True
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=MERGES_IN_FLIGHT, thread_name_prefix="embedrank-merge")
        self._merges[piece.item] = self._pool.submit(self._timed_merge, tiling)
        return commits

    def _timed_merge(self, pieces: list[Piece]) -> tuple[list[Piece], list[Piece], float]:
        began = time.monotonic()
        return pieces, self._merge(pieces), time.monotonic() - began

    def merged_commits(self, wait: bool = False) -> list[ItemCommit]:
        """Commit the items whose merge has finished (`wait`: every merge, waiting for those still running)."""
        commits = []
        for item_id in [i for i, f in self._merges.items() if wait or f.done()]:
            try:
                before, after, seconds = self._merges.pop(item_id).result()
            except OutputError:
                raise
            except Exception as exc:  # a storage or task failure, named with its item
                raise OutputError(f"merging the pieces of item {item_id} failed ({type(exc).__name__}: {exc}); "
                                  "the item is not committed: rerun the same command to resume") from exc
            failpoints.hit("after_merge")
            self.merged.add(before, after, seconds)
            commits.append(self._commit(self.pending[item_id], after))
        return commits

    def finish(self, stall_timeout_s: float | None = None) -> list[ItemCommit]:
        """Once every piece is in: wait for the merges in flight and commit their items; merges still running
        after `stall_timeout_s` fail the job as a stalled stage would (committed work is kept)."""
        _, running = wait(list(self._merges.values()), timeout=stall_timeout_s)
        if running:
            raise PipelineStalled(f"{len(running)} item merge(s) did not finish within run.stall_timeout_s "
                                  f"({stall_timeout_s:.0f}s); committed work is kept; rerun the same command to "
                                  "resume", "merge")
        commits = self.merged_commits(wait=True)
        if self._pool is not None:
            self._pool.shutdown()
        return commits

    def _commit(self, state: _ItemState, pieces: list[Piece]) -> ItemCommit:
        item = state.item
        record = ItemCommit.of_pieces(
            item=item.item_id, fingerprint_id=self.fp_id, source=item.rel, row_start=item.row_start,
            row_end=item.row_start + (state.rows or 0), pieces=pieces,
            bad_file=BadFile(item.bad_reason, item.bad_detail) if item.bad_reason else None)
        stored = self.root.write_commit(record)  # another writer's identical record, if it committed first
        del self.pending[item.item_id]
        return stored

    def unfinished(self) -> dict[str, list[tuple[int, int]]]:
        """Each uncommitted item's reported row ranges, for the error that names them."""
        return {item_id: sorted((p.start, p.end) for p in s.pieces) for item_id, s in self.pending.items()}
