"""Orphan removal never deletes a file that a commit record in the store names when it deletes.

It reads the records themselves (every piece's own item record by its name, not only a listing of `_commits/`,
nor only the driver's memory), and a piece of an item that no record commits yet is kept while it is younger
than the grace period (a writer may be about to commit it). A piece of an item whose record exists and does
not name it is dead for good (a record is created once) and goes at once, so an end-of-run cleanup is complete.
"""

import time

from pipelines.output import root as root_module
from pipelines.output.records import FileRef, ItemCommit, RankCommit
from pipelines.output.root import COMMITS_DIR, ORPHAN_GRACE_S, OutputRoot
from pipelines.storage import Storage

A, B, C = "a" * 20, "b" * 20, "c" * 20  # item ids as plans make them (20 hex digits)


def piece(store, item, first=0, last=0, folder="data"):
    path = f"{folder}/{item}-{first}-{last}-0123456789ab.parquet"
    store.write_bytes(path, b"piece")
    return path


def commit(item, *paths):
    return ItemCommit(item=item, fingerprint_id="fp", source=f"{item}.parquet", row_start=0, row_end=1,
                      files=tuple(FileRef(p, 1, "0" * 64) for p in paths), rows=len(paths))


def later(monkeypatch, seconds):
    """The orphan sweep's clock, `seconds` ahead (as if that much time had passed since the pieces were written)."""
    monkeypatch.setattr(root_module, "_now", lambda: time.time() + seconds)


def test_files_a_record_in_the_store_names_survive_though_the_driver_never_saw_it(store, monkeypatch):
    mine, theirs = piece(store, A), piece(store, B)
    stray = piece(store, B, 1, 1)
    root = OutputRoot(store)
    root.write_commit(commit(A, mine))
    OutputRoot(store).write_commit(commit(B, theirs))  # another writer, after this driver read its commits
    later(monkeypatch, 2 * ORPHAN_GRACE_S)  # every piece old: only the records protect them
    assert root.remove_orphans({A: commit(A, mine)}) == [stray]
    assert store.exists(mine) and store.exists(theirs) and not store.exists(stray)


def test_a_fresh_unnamed_piece_survives_the_grace_period_and_goes_after_it(store, monkeypatch):
    named, pending = piece(store, A), piece(store, B)  # B: a writer may still commit it
    dead = piece(store, A, 1, 1)  # A's record exists and does not name it: no writer can commit it any more
    root = OutputRoot(store)
    root.write_commit(commit(A, named))
    assert root.remove_orphans({A: commit(A, named)}) == [dead]
    assert store.exists(pending) and not store.exists(dead)
    later(monkeypatch, ORPHAN_GRACE_S + 60)
    assert root.remove_orphans({A: commit(A, named)}) == [pending]
    assert store.list_files("data") == [named]


def test_the_grace_period_is_a_setting_and_verify_counts_without_it(store):
    pending = piece(store, C)
    assert OutputRoot(store).orphans([]) == [pending]  # what verify counts: any piece no record names
    assert OutputRoot(store).remove_orphans({}) == [] and store.exists(pending)
    assert OutputRoot(store, orphan_grace_s=0).remove_orphans({}) == [pending] and not store.exists(pending)


def test_a_record_the_listing_misses_still_protects_its_files(store, monkeypatch):
    files = [piece(store, A), piece(store, B, folder="_rejects"), piece(store, C)]
    rank = "data/rank-00003-0123456789ab.parquet"
    store.write_bytes(rank, b"ranked")
    root = OutputRoot(store)
    root.write_commit(commit(A, files[0]))
    root.write_commit(commit(B, files[1]))
    root.write_rank_commit(RankCommit(bucket=3, fingerprint_id="fp", files=(FileRef(rank, 1, "0" * 64),),
                                      queries=1, rows=1, scored=1))
    assert store.exists(f"{COMMITS_DIR}/{A}.json")
    listed = Storage.list_files

    def listing_that_misses_records(self, rel_dir):  # an incomplete listing: objects exist, names are missing
        return [p for p in listed(self, rel_dir) if not p.startswith(("_commits/", "_rank_commits/"))]

    monkeypatch.setattr(Storage, "list_files", listing_that_misses_records)
    later(monkeypatch, 2 * ORPHAN_GRACE_S)
    assert root.remove_orphans({}) == [files[2]]  # C has no record: old, so an orphan
    for kept in (files[0], files[1], rank):
        assert store.exists(kept), kept
