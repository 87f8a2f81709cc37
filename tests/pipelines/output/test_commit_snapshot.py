"""The commit snapshot: a resume and `status` take unchanged records from `_commits_snapshot.parquet` instead of
one GET each, and a record made again since (another version listed) or a damaged snapshot only costs GETs."""

import dataclasses
import json

import pytest

from common.errors import OutputError
from pipelines.input.plan import WorkItem
from pipelines.output import root as root_module
from pipelines.output.commit_snapshot import SNAPSHOT_FILE
from pipelines.output.records import ItemCommit
from pipelines.output.root import COMMITS_DIR, OutputRoot
from pipelines.output.status import job_status
from pipelines.storage import Storage

FP = {"task": "embed", "model": "m"}
FP_ID = "f" * 16


def items(n: int) -> list[WorkItem]:
    return [WorkItem(f"{k:020x}", "/in/a.parquet", "a.parquet", "parquet", 10 * k, 10 * k + 10, (k, k + 1), 70,
                     size=1, version="v") for k in range(n)]


def commit(item: WorkItem, rows: int = 10) -> ItemCommit:
    return ItemCommit(item=item.item_id, fingerprint_id=FP_ID, source=item.rel, row_start=item.row_start,
                      row_end=item.row_end, rows=rows, tokens=rows, committed_at="2026-11-30T05:00:00+00:00")


@pytest.fixture
def record_gets(monkeypatch):
    """The commit records read one GET each, by any Storage from now on."""
    gets: list[str] = []
    original = Storage.read_bytes

    def counting(self, rel):
        if rel.startswith(f"{COMMITS_DIR}/"):
            gets.append(rel)
        return original(self, rel)

    monkeypatch.setattr(Storage, "read_bytes", counting)
    return gets


def test_a_second_resume_and_status_read_the_records_from_the_snapshot(store, record_gets):
    planned = items(6)
    root = OutputRoot(store)
    root.prepare(FP, FP_ID, planned, {}, plan_key="k")
    written = {i.item_id: root.write_commit(commit(i)) for i in planned[:5]}
    assert not store.exists(SNAPSHOT_FILE)

    assert OutputRoot(store).prepare(FP, FP_ID, planned, {}, plan_key="k") == written
    assert len(record_gets) == 5 and store.exists(SNAPSHOT_FILE)  # read once each, then snapshot

    record_gets.clear()
    assert OutputRoot(store).prepare(FP, FP_ID, planned, {}, plan_key="k") == written
    assert record_gets == []
    status = job_status(store.url, store.storage_options)
    assert (status["items_committed"], status["rows"], status["items_total"]) == (5, 50, 6)
    assert record_gets == []

    root.write_commit(commit(planned[5], rows=4))  # committed after the snapshot: fetched, not missed
    assert job_status(store.url, store.storage_options)["rows"] == 54
    assert record_gets == [f"{COMMITS_DIR}/{planned[5].item_id}.json"]


def test_a_record_made_again_is_read_from_the_store_not_the_snapshot(tmp_path, record_gets):
    storage = Storage(str(tmp_path / "out"))
    planned = items(3)
    root = OutputRoot(storage)
    root.prepare(FP, FP_ID, planned, {})
    for item in planned:
        root.write_commit(commit(item))
    root.write_commit_snapshot(root.read_commits())
    storage.delete([f"{COMMITS_DIR}/{planned[1].item_id}.json"])  # a user drops it to have it redone ...
    remade = dataclasses.replace(commit(planned[1]), rows=7)  # ... and a run commits it again, otherwise
    OutputRoot(storage).write_commit(remade)

    record_gets.clear()
    found = OutputRoot(storage).prepare(FP, FP_ID, planned, {})
    assert found[planned[1].item_id].rows == 7 and found[planned[0].item_id].rows == 10
    assert record_gets == [f"{COMMITS_DIR}/{planned[1].item_id}.json"]


def test_a_damaged_snapshot_costs_gets_only(tmp_path, record_gets):
    storage = Storage(str(tmp_path / "out"))
    planned = items(4)
    root = OutputRoot(storage)
    root.prepare(FP, FP_ID, planned, {})
    for item in planned:
        root.write_commit(commit(item))
    storage.write_bytes(SNAPSHOT_FILE, b"not parquet")
    record_gets.clear()
    assert len(OutputRoot(storage).prepare(FP, FP_ID, planned, {})) == 4
    assert len(record_gets) == 4
    record_gets.clear()
    assert len(OutputRoot(storage).prepare(FP, FP_ID, planned, {})) == 4  # rewritten by the resume that read
    assert record_gets == []


def test_a_record_edited_in_place_is_not_taken_from_the_snapshot(tmp_path):
    """A record rewritten with another fingerprint (same size) after the snapshot is still caught by a resume."""
    storage = Storage(str(tmp_path / "out"))
    planned = items(2)
    root = OutputRoot(storage)
    root.prepare(FP, FP_ID, planned, {})
    for item in planned:
        root.write_commit(commit(item))
    root.write_commit_snapshot(root.read_commits())
    path = tmp_path / "out" / COMMITS_DIR / f"{planned[0].item_id}.json"
    data = json.loads(path.read_text())
    data["fingerprint_id"] = "0" * len(FP_ID)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    with pytest.raises(OutputError, match=r"1 commit\(s\) carry another fingerprint"):
        OutputRoot(storage).prepare(FP, FP_ID, planned, {})


def test_reading_many_named_records_takes_current_ones_from_the_snapshot(tmp_path, record_gets):
    """`read_commits(ids)` (the readers' and verify's path): listed records at the snapshot's version come from
    it; an id the listing lacks is still one GET (a listing is not trusted to prove a record absent there)."""
    storage = Storage(str(tmp_path / "out"))
    planned = items(70)
    root = OutputRoot(storage)
    root.prepare(FP, FP_ID, planned, {})
    for item in planned[:69]:
        root.write_commit(commit(item))
    root.write_commit_snapshot(root.read_commits())
    record_gets.clear()
    found = OutputRoot(storage).read_commits([i.item_id for i in planned])
    assert list(found) == [i.item_id for i in planned[:69]]
    assert record_gets == [f"{COMMITS_DIR}/{planned[69].item_id}.json"]


def test_a_writer_snapshots_every_so_many_records_so_a_crash_leaves_few_to_get(tmp_path, record_gets, monkeypatch):
    monkeypatch.setattr(root_module, "SNAPSHOT_EVERY", 3)
    storage = Storage(str(tmp_path / "out"))
    planned = items(8)
    root = OutputRoot(storage)
    root.prepare(FP, FP_ID, planned, {})
    for item in planned[:7]:  # then the driver dies: no close, no final snapshot
        root.write_commit(commit(item))
    record_gets.clear()
    found = OutputRoot(storage).prepare(FP, FP_ID, planned, {})
    assert list(found) == [i.item_id for i in planned[:7]]
    assert record_gets == [f"{COMMITS_DIR}/{planned[6].item_id}.json"]  # the 7th came after the last snapshot
