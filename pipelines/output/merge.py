"""Merging an item's pieces into reader-sized files before the item commits.

Ray Data decides how rows reach the write tasks (blocks are split and bundled by size, a retried or restarted
actor resends part of an item), so an item can arrive as several pieces. Readers and object-store listings want
few large files, so before an item commits, runs of its consecutive pieces whose data fits one file of
`output.target_file_mb` are rewritten as one file (per partition folder; rejects likewise). A piece that is alone
in its run is kept as it is.

The merge stays inside the exactly-once protocol: merged files get content-hashed piece names of the item
(`<item>-<first>-<last>-<hash>.parquet`), the source pieces are left alone, and only the commit record that names
the merged files makes them count. A merge that dies leaves files no record names: orphans, removed as any other.
What a merge costs is one read and one write of the item's bytes, on a cluster task (`Committer` decides where).
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath

import pyarrow as pa

from common import failpoints
from common.errors import OutputError
from pipelines.output.pieces import put_piece
from pipelines.output.records import FileRef, Piece, sum_histograms, sum_reasons
from pipelines.storage import Storage
from pipelines import parquet_bytes


def piece_bytes(piece: Piece) -> int:
    return sum(f.bytes or 0 for f in piece.data_files)


def pack(pieces: list[Piece], target_bytes: float) -> list[list[Piece]]:
    """The item's pieces (in row order) in runs of consecutive pieces whose data files fit `target_bytes`."""
    groups: list[list[Piece]] = []
    size = 0.0
    for piece in pieces:
        if groups and size + piece_bytes(piece) <= target_bytes:
            groups[-1].append(piece)
            size += piece_bytes(piece)
        else:
            groups.append([piece])
            size = piece_bytes(piece)
    return groups


def needs_merge(pieces: list[Piece], target_bytes: float) -> bool:
    return any(len(g) > 1 for g in pack(pieces, target_bytes))


def _read_checked(storage: Storage, ref: FileRef) -> pa.Table:
    data = storage.read_bytes(ref.path)
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise OutputError(f"{storage.url}: piece {ref.path} changed since it was written (checksum differs); "
                          "its item is not committed: rerun to resume")
    return parquet_bytes.read_table(data)


def _merged_file(storage: Storage, refs: list[FileRef], stem: str, epoch: int) -> FileRef:
    tables = [_read_checked(storage, r) for r in refs]
    table = pa.concat_tables(tables, promote_options="permissive").replace_schema_metadata(tables[0].schema.metadata)
    return put_piece(storage, posixpath.dirname(refs[0].path), stem, table, None, epoch)


def _merge_run(storage: Storage, run: list[Piece], epoch: int) -> Piece:
    """One piece for `run` (consecutive pieces of one item): a file per partition folder, one for its rejects."""
    item, start, end = run[0].item, run[0].start, run[-1].end
    stem = f"{item}-{start}-{end - 1}"
    folders: dict[str, list[FileRef]] = {}
    for piece in run:
        for ref in piece.data_files:
            folders.setdefault(posixpath.dirname(ref.path), []).append(ref)
    files = tuple(_merged_file(storage, refs, stem, epoch) for _, refs in sorted(folders.items()))
    rejects = [p.reject_file for p in run if p.reject_file]
    reject_file = None
    if rejects:
        reject_file = rejects[0] if len(rejects) == 1 else _merged_file(storage, rejects, stem, epoch)
    return Piece(item=item, start=start, end=end, item_rows=run[0].item_rows, data_files=files,
                 reject_file=reject_file, reject_reasons=sum_reasons(p.reject_reasons for p in run),
                 tokens=sum(p.tokens for p in run), padded_tokens=sum(p.padded_tokens for p in run),
                 length_hist=tuple(sum_histograms(p.length_hist for p in run)),
                 carried_rows=sum(p.carried_rows for p in run))


def merge_item(storage: Storage, pieces: list[Piece], target_bytes: float, epoch: int = 0) -> list[Piece]:
    """The pieces that tile an item (in row order), with each run that fits one file merged into one piece (named as
    of the lease `epoch` of the driver that asked for the merge)."""
    merged = [run[0] if len(run) == 1 else _merge_run(storage, run, epoch) for run in pack(pieces, target_bytes)]
    failpoints.hit("merge_write")
    return merged


@dataclasses.dataclass
class MergeStats:
    """What merging cost a run: items merged, pieces read, files written and their bytes, task seconds."""

    items: int = 0
    pieces: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def add(self, before: list[Piece], after: list[Piece], seconds: float) -> None:
        new = [p for p in after if p not in before]
        self.items += 1
        self.pieces += len(before)
        self.files += sum(len(p.data_files) + (p.reject_file is not None) for p in new)
        self.bytes += sum(f.bytes or 0 for p in new for f in p.data_files)
        self.seconds += seconds

    def to_json(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3)}

    def line(self) -> str:
        return (f"merged: {self.items:,} item(s) that arrived in {self.pieces:,} pieces, into {self.files:,} file(s) "
                f"({self.bytes / 2**20:,.1f} MiB rewritten, {self.seconds:.1f}s of merge tasks)")
