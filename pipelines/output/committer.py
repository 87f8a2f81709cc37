"""The driver's commit loop: the single committer, as Spark's driver commits tasks.

Write tasks report pieces; an item commits as soon as a subset of its reported
pieces tiles its rows exactly (retries and re-executed tasks may report
duplicate or overlapping pieces, see `tiling`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pipelines.input.plan import WorkItem
from pipelines.output.records import BadFile, ItemCommit, Piece
from pipelines.output.root import OutputRoot
from pipelines.output.tiling import find_tiling


@dataclasses.dataclass
class _ItemState:
    item: WorkItem
    pieces: list[Piece] = dataclasses.field(default_factory=list)
    seen: set[tuple] = dataclasses.field(default_factory=set)
    rows: int | None = None


class Committer:
    """Collects piece records per item and commits an item as soon as some of its pieces tile it.

    An item's state is dropped when it commits, so memory follows the items in flight, not the job."""

    def __init__(self, root: OutputRoot, fp_id: str, items: list[WorkItem]):
        self.root = root
        self.fp_id = fp_id
        self.pending: dict[str, _ItemState] = {
            i.item_id: _ItemState(i, rows=None if i.row_end is None else i.row_end - i.row_start) for i in items
        }

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

    def add(self, piece: Piece) -> ItemCommit | None:
        """Take one piece record; return the commit record if this piece completed its item."""
        state = self.pending.get(piece.item)
        if state is None or piece.key in state.seen:
            return None
        state.seen.add(piece.key)
        state.pieces.append(piece)
        if state.rows is None:
            state.rows = piece.item_rows
        start = state.item.row_start
        path = find_tiling([(p.start, p.end) for p in state.pieces], start, start + state.rows)
        if path is None:
            return None
        return self._commit(state, [state.pieces[i] for i in path])

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
