"""Inputs are pinned: a run reads the version of each file its plan recorded, or fails naming the file.

A shard rewritten between planning and reading must never be committed under the old item id, and a
store-side change must never turn into rejected rows (`unreadable_row_group`), whatever `on_bad_file` says.
"""

import dataclasses
import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import InputChanged, OutputError
from pipelines.config import MIB
from pipelines.embed.config import InputConfig
from pipelines.input import parquet_io
from pipelines.input import plan as plan_module
from pipelines.input.plan import WorkItem, make_plan
from pipelines.input.reading import read_item
from pipelines.output.records import ItemCommit
from pipelines.output.root import OutputRoot
from pipelines.storage import Storage


def parquet_bytes(texts, row_group_size):
    buf = io.BytesIO()
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts}), buf,
                   row_group_size=row_group_size)
    return buf.getvalue()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    """(corpus folder URL, storage options, write(name, bytes)) on local disk or the test S3 server."""
    if request.param == "local":
        corpus = tmp_path / "corpus"
        corpus.mkdir()

        def write(name, data):
            time.sleep(0.01)  # a rewrite in the same clock tick as the first write keeps its mtime
            (corpus / name).write_bytes(data)
        return str(corpus), {}, write
    bucket, opts = request.getfixturevalue("s3_bucket")
    fs = Storage(f"s3://{bucket}", opts).fs

    def write_s3(name, data):
        fs.pipe_file(f"{bucket}/corpus/{name}", data)
        fs.invalidate_cache()
    return f"s3://{bucket}/corpus", opts, write_s3


# 8 rows in two row groups; a rewrite keeps the shape, or has one row group fewer (its second item's group is gone)
ORIGINAL = [f"original {i}" for i in range(8)]
REWRITES = {
    "same_row_groups": (lambda: parquet_bytes([f"rewritten {i}" for i in range(8)], 4)),
    "fewer_row_groups": (lambda: parquet_bytes([f"rewritten {i}" for i in range(4)], 4)),
}


@pytest.mark.parametrize("on_bad_file", ["reject", "fail"])
@pytest.mark.parametrize("rewrite", sorted(REWRITES))
def test_a_parquet_shard_rewritten_after_planning_fails_the_read_naming_it(store, rewrite, on_bad_file):
    corpus, opts, write = store
    write("part-0.parquet", parquet_bytes(ORIGINAL, 4))
    write("part-1.parquet", parquet_bytes(ORIGINAL, 4))
    cfg = InputConfig(paths=[f"{corpus}/*.parquet"], id_column="doc_id", rows_per_item=4, storage_options=opts,
                      on_bad_file=on_bad_file)
    items = make_plan(cfg).items
    assert len(items) == 4 and all(i.size and i.version for i in items)
    write("part-0.parquet", REWRITES[rewrite]())
    for item in items[:2]:  # both items of the rewritten shard: never its new rows, never rejects
        with pytest.raises(InputChanged, match=r"part-0\.parquet changed since the job was planned") as err:
            read_item(item, cfg)
        assert "rerun" in str(err.value).lower()
    untouched = read_item(items[2], cfg)  # the other shard reads as planned
    assert untouched.column("text").to_pylist() == ORIGINAL[:4]
    assert untouched.column("_reject").null_count == 4


def test_a_jsonl_shard_rewritten_after_planning_fails_the_read_naming_it(store):
    corpus, opts, write = store
    write("a.jsonl", b'{"text": "one"}\n{"text": "two"}\n')
    cfg = InputConfig(paths=[f"{corpus}/*.jsonl"], format="jsonl", storage_options=opts)
    (item,) = make_plan(cfg).items
    assert read_item(item, cfg).column("text").to_pylist() == ["one", "two"]
    write("a.jsonl", b'{"text": "uno"}\n{"text": "dos"}\n')  # same size, other bytes
    with pytest.raises(InputChanged, match=r"a\.jsonl changed since the job was planned"):
        read_item(item, cfg)


def test_a_jsonl_shard_cut_into_byte_ranges_reads_them_pinned(store, monkeypatch):
    """Each range is a ranged read of the pinned version (S3: a range GET with `If-Match`); a rewrite after the
    file was opened and checked, before its range is read, still fails the read naming the file."""
    corpus, opts, write = store
    data = b"".join(json.dumps({"text": f"line {i} \u00e9"}).encode() + b"\n" for i in range(30))
    write("a.jsonl", data)
    cfg = InputConfig(paths=[f"{corpus}/*.jsonl"], format="jsonl", storage_options=opts,
                      jsonl_item_mb=len(data) / 4 / MIB)
    items = make_plan(cfg).items
    assert len(items) == 4 and all(i.byte_range for i in items)
    tables = [read_item(i, cfg) for i in items]
    assert [t for table in tables for t in table.column("text").to_pylist()] == [f"line {i} \u00e9" for i in range(30)]
    assert all(table.num_rows for table in tables)
    opened = parquet_io.open_input

    def open_then_rewrite(url, storage_options):
        fh = opened(url, storage_options)
        write("a.jsonl", data.replace(b"line", b"LINE"))  # same size, other bytes
        return fh

    monkeypatch.setattr(parquet_io, "open_input", open_then_rewrite)
    with pytest.raises(InputChanged, match=r"a\.jsonl changed since the job was planned") as err:
        read_item(items[2], cfg)
    if opts:  # S3: the range GET itself was refused (412), not only the check after the read
        assert "replaced while being read" in str(err.value)


def test_work_items_carry_their_pin_and_old_job_records_still_read(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    cfg = InputConfig(paths=[str(tmp_path / "a.jsonl")], format="jsonl")
    plan = make_plan(cfg)
    (item,) = plan.items
    (listed,) = plan.files
    assert (item.size, item.version) == (listed.size, listed.version)
    assert WorkItem.from_dict(json.loads(json.dumps(item.to_dict()))) == item
    # an item recorded in `_job.json` before pins existed: read as before, unchecked
    old = {k: v for k, v in item.to_dict().items() if k not in ("size", "version")}
    unpinned = WorkItem.from_dict(old)
    assert unpinned.size is None and unpinned.version is None
    time.sleep(0.01)
    (tmp_path / "a.jsonl").write_text('{"text": "two"}\n')
    assert read_item(unpinned, cfg).column("text").to_pylist() == ["two"]
    with pytest.raises(InputChanged):
        read_item(item, cfg)


def test_a_file_that_changes_between_listing_and_its_footer_read_fails_planning(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "p.parquet")
    cfg = InputConfig(paths=[str(tmp_path / "p.parquet")])
    listed = plan_module.expand_inputs

    def listed_before_a_rewrite(*args):
        return [dataclasses.replace(f, version="an older version") for f in listed(*args)]

    monkeypatch.setattr(plan_module, "expand_inputs", listed_before_a_rewrite)
    with pytest.raises(InputChanged, match=r"p\.parquet changed since the job was planned"):
        make_plan(cfg)


class ExpiringFile(io.BytesIO):
    """A file whose reads fail as s3fs's do when the object's ETag no longer matches (`If-Match` → 412)."""

    def read(self, *args):
        from s3fs.utils import FileExpired

        raise FileExpired(filename="bucket/p.parquet", e_tag='"abc"')


def test_an_object_replaced_mid_read_is_a_change_not_a_store_failure_nor_corrupt(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "p.parquet")
    cfg = InputConfig(paths=[str(tmp_path / "p.parquet")])
    item = make_plan(cfg).items[0]
    data = (tmp_path / "p.parquet").read_bytes()
    monkeypatch.setattr(parquet_io, "open_input", lambda url, opts: ExpiringFile(data))
    with pytest.raises(InputChanged, match=r"p\.parquet changed since the job was planned"):
        read_item(item, cfg)


def test_the_rerun_refusal_names_the_changed_file_and_points_to_reindex(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "one"}\n')
    (corpus / "b.jsonl").write_text('{"text": "two"}\n')
    cfg = InputConfig(paths=[str(corpus / "*.jsonl")], format="jsonl")
    out = Storage(str(tmp_path / "out"))
    first = make_plan(cfg).items
    root = OutputRoot(out)
    root.prepare({"job": 1}, "fp", first, {})
    for item in first:
        root.write_commit(ItemCommit(item=item.item_id, fingerprint_id="fp", source=item.rel, row_start=0,
                                     row_end=1))
    time.sleep(0.01)
    (corpus / "a.jsonl").write_text('{"text": "uno"}\n')
    with pytest.raises(OutputError, match="not in the current plan") as err:
        OutputRoot(out).prepare({"job": 1}, "fp", make_plan(cfg).items, {})
    message = str(err.value)
    assert "a.jsonl" in message and "b.jsonl" not in message, message
    assert "embedrank reindex" in message and "output.path" in message, message


@pytest.mark.integration
def test_a_job_whose_shard_is_rewritten_after_planning_stops_naming_it_and_commits_none_of_it(
        ray_local, tmp_path, tiny_embedding_model, monkeypatch):
    from pipelines import lifecycle
    from pipelines.cli import _user_error
    from pipelines.embed.config import EmbedJobConfig
    from pipelines.embed.job import run_embed

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.parquet", "b.parquet"):
        (corpus / name).write_bytes(parquet_bytes(ORIGINAL, 4))
    planned, plans = lifecycle.make_plan, []

    def plan_then_rewrite(cfg, **options):  # the shard changes in the store between planning and reading
        plan = planned(cfg, **options)
        plans.append(plan)
        time.sleep(0.01)
        (corpus / "b.parquet").write_bytes(REWRITES["fewer_row_groups"]())
        return plan

    monkeypatch.setattr(lifecycle, "make_plan", plan_then_rewrite)
    out = tmp_path / "out"
    cfg = EmbedJobConfig.model_validate({
        "input": {"paths": [f"{corpus}/*.parquet"], "id_column": "doc_id", "rows_per_item": 4},
        "model": {"path": str(tiny_embedding_model), "max_length": 16}, "output": {"path": str(out)}})
    with pytest.raises(Exception) as err:  # Ray wraps it; the CLI finds it as `_user_error` does
        run_embed(cfg)
    found = _user_error(err.value)
    assert isinstance(found, InputChanged), err.value
    assert "b.parquet changed since the job was planned" in str(found) and found.exit_code == 2
    b_items = {i.item_id for plan in [*plans, planned(cfg.input)] for i in plan.items if i.rel == "b.parquet"}
    assert len(b_items) == 3  # two items as planned, one as the file is now
    committed = {p.stem for p in (out / "_commits").glob("*.json")} if (out / "_commits").exists() else set()
    assert not committed & b_items
    rejects = list((out / "_rejects").glob("*.parquet")) if (out / "_rejects").exists() else []
    assert rejects == []  # a store-side change is never rejected data
