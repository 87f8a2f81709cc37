"""The stored plan: `_job.json` holds a header, the items lie in content-addressed shards under `_plan/`; a resume
with the same plan writes no shard; outputs with inline items still read; a resume reuses the stored items of
unchanged input files instead of reading their Parquet footers; status and report count from the header."""

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import EmbedJob
from pipelines.input import plan as plan_module
from pipelines.input.plan import WorkItem, make_plan, planning_key
from pipelines.output import plan_store
from pipelines.output.records import ItemCommit
from pipelines.output.report import rebuild_report
from pipelines.output.root import JOB_FILE, OutputRoot
from pipelines.output.status import job_status
from pipelines.storage import Storage

FP = {"task": "embed", "model": "m"}
FP_ID = "f" * 16


def items(n: int, rows: int = 10, rel: str = "a.parquet") -> list[WorkItem]:
    return [WorkItem(f"{k:020x}", f"/in/{rel}", rel, "parquet", k * rows, (k + 1) * rows, (k, k + 1), 7 * rows,
                     size=1234, version="v1") for k in range(n)]


def commit(item: WorkItem, rows: int | None = None, when: str = "2026-11-30T05:00:00+00:00") -> ItemCommit:
    rows = item.row_end - item.row_start if rows is None else rows
    return ItemCommit(item=item.item_id, fingerprint_id=FP_ID, source=item.rel, row_start=item.row_start,
                      row_end=item.row_end, rows=rows, tokens=3 * rows, committed_at=when)


def written(monkeypatch, storage: Storage) -> list[str]:
    """The paths `storage` writes from now on."""
    paths: list[str] = []
    for name in ("write_bytes", "create", "replace"):  # control files are written with conditions
        original = getattr(storage, name)
        monkeypatch.setattr(storage, name, lambda rel, *args, _o=original: (paths.append(rel), _o(rel, *args))[1])
    return paths


def test_shards_round_trip_and_job_json_holds_only_a_header(store, monkeypatch):
    monkeypatch.setattr(plan_store, "SHARD_ITEMS", 3)
    planned = items(7)
    root = OutputRoot(store)
    root.prepare(FP, FP_ID, planned, {"run": {}}, plan_key="k1")
    stored = json.loads(store.read_bytes(JOB_FILE))
    assert "items" not in stored
    header = stored["plan"]
    assert header["items"] == 7 and header["known_rows"] == 70 and header["planned_with"] == "k1"
    assert header["shards"] == ["items-00000-e0.parquet", "items-00001-e0.parquet", "items-00002-e0.parquet"]
    assert sorted(store.list_files("_plan")) == [f"_plan/{header['digest']}/{n}" for n in header["shards"]]
    assert [len(shard) for shard in root.iter_planned_items()] == [3, 3, 1]
    assert [i for shard in root.iter_planned_items() for i in shard] == planned
    assert root.read_job()["items"] == [i.to_dict() for i in planned]  # the compatible, whole form
    assert root.planned_item_ids() == [i.item_id for i in planned]
    table = pq.read_table(io.BytesIO(store.read_bytes(f"_plan/{header['digest']}/items-00000-e0.parquet")))
    assert table.num_rows == 3 and table.column("rg_end").to_pylist() == [1, 2, 3]


def test_a_resume_with_the_same_plan_writes_no_shard(store, monkeypatch):
    monkeypatch.setattr(plan_store, "SHARD_ITEMS", 4)
    planned = items(9)
    OutputRoot(store).prepare(FP, FP_ID, planned, {}, plan_key="k1")
    first = json.loads(store.read_bytes(JOB_FILE))["plan"]
    paths = written(monkeypatch, store)
    OutputRoot(store).prepare(FP, FP_ID, planned, {}, plan_key="k1")
    assert paths == [JOB_FILE]  # the header only
    assert json.loads(store.read_bytes(JOB_FILE))["plan"] == first

    paths.clear()
    grown = planned + items(1, rel="b.parquet")  # a new input file: another plan, all its shards written
    OutputRoot(store).prepare(FP, FP_ID, grown, {}, plan_key="k1")
    header = json.loads(store.read_bytes(JOB_FILE))["plan"]
    assert header["digest"] != first["digest"] and header["items"] == 10
    assert paths == [f"_plan/{header['digest']}/items-0000{k}-e0.parquet" for k in range(3)] + [JOB_FILE]
    assert OutputRoot(store).planned_item_ids() == [i.item_id for i in grown]
    # the superseded plan's shards stay (a reader of the old header may still read them)
    assert len(store.list_files(f"_plan/{first['digest']}")) == 3


def test_an_output_with_inline_items_still_reads_and_a_resume_moves_them_to_shards(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    planned = items(5)
    storage.write_bytes(JOB_FILE, json.dumps({
        "fingerprint": FP, "fingerprint_id": FP_ID, "config": {}, "updated_at": "2026-11-30T04:00:00+00:00",
        "items": [i.to_dict() for i in planned]}).encode())
    root = OutputRoot(storage)
    for item in planned[:2]:
        root.write_commit(commit(item))
    assert root.planned_item_ids() == [i.item_id for i in planned]
    assert [i for shard in root.iter_planned_items() for i in shard] == planned
    assert list(root.read_planned_commits()) == [i.item_id for i in planned[:2]]
    status = job_status(str(tmp_path / "out"))
    assert (status["items_committed"], status["items_total"], status["rows"], status["planned_rows"]) == (2, 5, 20, 50)
    assert root.previous_plan() is None  # nothing recorded which settings cut the inline items

    assert set(root.prepare(FP, FP_ID, planned, {}, plan_key="k1")) == {i.item_id for i in planned[:2]}
    stored = json.loads(storage.read_bytes(JOB_FILE))
    assert "items" not in stored and stored["plan"]["items"] == 5
    assert root.read_job()["items"] == [i.to_dict() for i in planned]


def test_status_and_report_count_from_the_header_and_the_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_store, "SHARD_ITEMS", 2)
    out = tmp_path / "out"
    root = OutputRoot(Storage(str(out)))
    planned = items(5)
    planned[4] = WorkItem("e" * 20, "/in/b.jsonl", "b.jsonl", "jsonl", 0, None, None, 100)  # rows unknown
    root.prepare(FP, FP_ID, planned, {}, plan_key="k1")
    root.write_commit(commit(planned[0]))
    root.write_commit(commit(planned[3], rows=8))
    root.write_commit(commit(planned[4], rows=6))
    status = job_status(str(out))
    assert (status["items_committed"], status["items_total"]) == (3, 5)
    assert (status["rows"], status["planned_rows"], status["tokens"]) == (24, 40, 72)
    assert status["last_commit"] == "2026-11-30T05:00:00+00:00"
    rebuild_report(root)
    assert "<th>work items</th><td>3 of 5</td>" in (out / "_report.html").read_text()


def write_parquet(path, rows: int, marker: str = "x") -> None:
    pq.write_table(pa.table({"text": [f"{marker} {i}" for i in range(rows)]}), path, row_group_size=10)


@pytest.fixture
def footer_reads(monkeypatch):
    """The input files whose Parquet footer planning reads."""
    reads: list[str] = []
    original = plan_module.read_metadata

    def counting(url, *args, **kwargs):
        reads.append(os.path.basename(url))
        return original(url, *args, **kwargs)

    monkeypatch.setattr(plan_module, "read_metadata", counting)
    return reads


def test_a_resume_reads_no_footer_of_an_unchanged_file_and_rereads_a_changed_one(tmp_path, footer_reads):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b", "c"):
        write_parquet(corpus / f"{name}.parquet", 30)
    cfg = EmbedJobConfig.model_validate({"input": {"paths": [str(corpus)], "rows_per_item": 10},
                                         "model": {"path": str(tmp_path / "model")},
                                         "output": {"path": str(tmp_path / "out")}})
    root = OutputRoot(Storage(cfg.output.path))
    first = make_plan(cfg.input, previous=root.previous_plan())
    assert sorted(footer_reads) == ["a.parquet", "b.parquet", "c.parquet"] and first.reused_files == 0
    root.prepare(FP, FP_ID, first.items, {}, plan_key=planning_key(cfg.input))

    footer_reads.clear()
    again = EmbedJob().plan(cfg, io.StringIO())  # the lifecycle's plan step, as a resume runs it
    assert footer_reads == [] and again.items == first.items
    assert (again.reused_files, again.footers_read) == (3, 0)

    write_parquet(corpus / "b.parquet", 20, marker="y")  # changed: another size and mtime
    os.utime(corpus / "b.parquet", ns=(1_900_000_000_000_000_000,) * 2)
    stream = io.StringIO()
    changed = EmbedJob().plan(cfg, stream)
    assert footer_reads == ["b.parquet"]
    assert "2 unchanged file(s) planned as stored, 1 footer(s) read" in stream.getvalue()
    by_file = {rel: [i for i in changed.items if i.rel == rel] for rel in ("a.parquet", "b.parquet", "c.parquet")}
    assert [len(v) for v in by_file.values()] == [3, 2, 3]
    assert by_file["a.parquet"] + by_file["c.parquet"] == [i for i in first.items if i.rel != "b.parquet"]
    assert not {i.item_id for i in by_file["b.parquet"]} & {i.item_id for i in first.items}

    footer_reads.clear()
    recut = cfg.model_copy(update={"input": cfg.input.model_copy(update={"rows_per_item": 20})})
    assert planning_key(recut.input) != planning_key(cfg.input)
    make_plan(recut.input, previous=root.previous_plan())  # other settings cut the stored items: all read
    assert sorted(footer_reads) == ["a.parquet", "b.parquet", "c.parquet"]


def test_a_missing_shard_only_costs_footer_reads(tmp_path, footer_reads):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_parquet(corpus / "a.parquet", 30)
    cfg = EmbedJobConfig.model_validate({"input": {"paths": [str(corpus)], "rows_per_item": 10},
                                         "model": {"path": str(tmp_path / "model")},
                                         "output": {"path": str(tmp_path / "out")}})
    root = OutputRoot(Storage(cfg.output.path))
    first = make_plan(cfg.input)
    root.prepare(FP, FP_ID, first.items, {}, plan_key=planning_key(cfg.input))
    root.storage.delete(root.storage.list_files("_plan"))
    footer_reads.clear()
    assert make_plan(cfg.input, previous=root.previous_plan()).items == first.items
    assert footer_reads == ["a.parquet"]


def test_an_unreadable_stored_plan_means_no_reuse_not_an_error(tmp_path):
    (tmp_path / "blocked").write_text("a file where the output folder would be")
    assert OutputRoot(Storage(str(tmp_path / "blocked"))).previous_plan() is None
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / JOB_FILE).write_text("{not json")
    assert OutputRoot(Storage(str(tmp_path / "out"))).previous_plan() is None
