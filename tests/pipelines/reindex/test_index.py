"""Index roots without Ray: version names, rebased references, attempts, the pointer, the lock, config rules."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import OutputError
from pipelines.config import ConfigError, load_config
from pipelines.input.plan import WorkItem
from pipelines.output.lock import OutputLock
from pipelines.output.records import FileRef, ItemCommit
from pipelines.reindex.config import ReindexJobConfig
from pipelines.reindex.index import (
    CURRENT_FILE,
    IndexRoot,
    rebase,
    version_name,
    version_number,
)
from pipelines.reindex.match import diff_tasks, keep_by_digest, kept_commit, resolve
from pipelines.reindex.stages import content_hashes, item_digest
from pipelines.storage import Storage


def test_version_names_and_rebased_paths():
    assert version_name(12) == "v000012" and version_number("v000012") == 12 and version_number(None) == 0
    with pytest.raises(OutputError):
        version_number("v12")
    assert rebase("data/x.parquet", "v000001", "v000003") == "../v000001/data/x.parquet"
    # a reference of a reference points at the original file, not through the middle version
    assert rebase("../v000001/data/x.parquet", "v000002", "v000003") == "../v000001/data/x.parquet"
    assert rebase("data/lang=en/x.parquet", "v000003", "v000003") == "data/lang=en/x.parquet"


def test_storage_resolves_parent_segments_on_every_store(tmp_path):
    storage = Storage(str(tmp_path / "index" / "v000002"))
    Storage(str(tmp_path / "index")).write_bytes("v000001/data/f.bin", b"old")
    assert storage.read_bytes("../v000001/data/f.bin") == b"old"


def test_attempts_resume_only_from_the_same_base_settings_and_snapshot(tmp_path):
    index = IndexRoot(Storage(str(tmp_path / "idx")))
    log = io.StringIO()
    state = {"base": None, "fingerprint_id": "fp", "plan_digest": "p1"}
    name, fresh = index.start_attempt(None, state, log)
    assert name == "v000001" and fresh["plan_digest"] == "p1" and "started_at" in fresh
    index.storage.write_bytes("v000001/_commits/a.json", b"{}")
    again, resumed = index.start_attempt(None, state, log)
    assert again == "v000001" and resumed == fresh and index.storage.exists("v000001/_commits/a.json")
    other, _ = index.start_attempt(None, {**state, "plan_digest": "p2"}, log)
    # another snapshot: v000001 is tombstoned (its number is never reused) and emptied; the new attempt is next
    assert other == "v000002" and not index.storage.exists("v000001/_commits/a.json")
    assert index.is_discarded("v000001") and index.storage.list_files("v000001") == ["v000001/_reindex.json"]
    assert "discarding unpublished v000001 (1 file(s))" in log.getvalue()
    assert index.start_attempt(None, {**state, "plan_digest": "p2"}, log)[0] == "v000002"  # resumed, not v000003
    with pytest.raises(OutputError, match="no _SUCCESS"):
        index.publish("v000002", {})
    assert index.current() is None and not index.storage.exists(CURRENT_FILE)


def test_content_hash_depends_on_text_and_fingerprint():
    a = content_hashes(pa.array(["x", "y", None, "x"]), "fp1").to_pylist()
    b = content_hashes(pa.array(["x"]), "fp2").to_pylist()
    assert a[0] == a[3] != a[1] and a[2] is None and b[0] != a[0] and len(a[0]) == 32


def test_diff_and_moves_resolve_to_exact_counts():
    """Two files' local diffs: x3 moved from file a to b unchanged (carried from a's file), x4 moved and edited,
    n1 new, x9 deleted; counts are exact and only the moved unchanged document names a base file to carry from."""
    results = [
        {"unchanged": 5, "changed": 1, "rejected": 1, "new": [["n1", "h", "item-a"]],
         "gone": [["x3", "h3", "v1/data/a.parquet"], ["x4", "h4", "v1/data/a.parquet"],
                  ["x9", "h9", "v1/data/a.parquet"]]},
        {"unchanged": 7, "changed": 0, "rejected": 0, "new": [["x3", "h3", "item-b"], ["x4", "h4-edited", "item-b"]],
         "gone": []},
    ]
    counts, moved = resolve(results)
    assert counts == {"new": 1, "changed": 2, "unchanged": 13, "deleted": 1, "rejected": 1}
    assert moved == {"item-b": ["v1/data/a.parquet"]}


def _item(item_id: str, rel: str, start: int, end: int) -> WorkItem:
    return WorkItem(item_id, f"/c/{rel}", rel, "parquet", start, end, (0, 1), 0, size=1, version="1")


def _commit(item: str, source: str, start: int, end: int, **kw) -> ItemCommit:
    files = (FileRef(f"data/{item}.parquet", end - start, "0" * 64, 10, start, end),)
    return ItemCommit(item=item, fingerprint_id="fp", source=source, row_start=start, row_end=end, files=files,
                      rows=end - start, **kw)


def test_items_are_kept_by_digest_one_to_one_whatever_the_file_name():
    base = {"b1": _commit("b1", "a.parquet", 0, 10), "b2": _commit("b2", "b.parquet", 0, 10),
            "b3": _commit("b3", "c.parquet", 0, 10, rejected=1, rejects=(FileRef("_rejects/r", 1, "0" * 64),)),
            "b4": _commit("b4", "old.parquet", 0, 10)}
    digests = {"b1": "d1", "b2": "d1", "b3": "d3", "b4": "d4"}
    new = [_item("n1", "b.parquet", 0, 10), _item("n2", "c.parquet", 0, 10), _item("n3", "renamed.parquet", 20, 30),
           _item("n4", "z.parquet", 0, 10), _item("n5", "y.parquet", 0, 10)]
    kept = keep_by_digest(new, {"n1": "d1", "n2": "d3", "n3": "d4", "n4": "d1", "n5": None}, base, digests)
    # n1 takes the same file's b2; n4 (same digest) the other; b3 has rejects (never kept); n5 has no digest
    assert kept == {"n1": "b2", "n3": "b4", "n4": "b1"}
    record = kept_commit(base["b4"], new[2], lambda p: "../v000001/" + p, "v000001")
    assert (record.item, record.source, record.row_start, record.row_end) == ("n3", "renamed.parquet", 20, 30)
    assert record.files[0].path == "../v000001/data/b4.parquet" and (record.files[0].first_row,
                                                                       record.files[0].end_row) == (20, 30)
    assert record.carried == 10 and record.carried_from == "v000001"
    tasks = diff_tasks([new[0], new[1]], {"b.parquet": ["v1/b"], "c.parquet": ["v1/c"], "gone.parquet": ["v1/g"]})
    assert [(sorted(i["item_id"] for i in t["items"]), t["base_files"]) for t in tasks] == [
        (["n1"], ["v1/b"]), (["n2"], ["v1/c"]), ([], ["v1/g"])]


def test_item_digest_ignores_row_order_and_sees_ids_texts_and_pass_through():
    def rows(ids, hashes, lang=None, reject=None):
        t = pa.table({"id": ids, "content_hash": hashes, "_reject": reject or [None] * len(ids)})
        return t.append_column("lang", pa.array(lang)) if lang else t

    a = item_digest(rows(["x", "y"], ["1", "2"]), [])
    assert a == item_digest(rows(["y", "x"], ["2", "1"]), []) and len(a) == 32
    assert a != item_digest(rows(["x", "y"], ["1", "3"]), []) != item_digest(rows(["x", "z"], ["1", "2"]), [])
    assert item_digest(rows(["x"], ["1"], ["en"]), ["lang"]) != item_digest(rows(["x"], ["1"], ["de"]), ["lang"])
    assert item_digest(rows(["x", "y"], ["1", None], reject=[None, "empty_text"]), []) is None


def test_reindex_needs_an_id_column(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("input: {paths: [x]}\nmodel: {path: m}\nindex: {path: i}\n")
    with pytest.raises(ConfigError, match="input.id_column is required for reindexing"):
        load_config(cfg, schema=ReindexJobConfig)
    with pytest.raises(ConfigError, match="index.partition_by"):
        load_config(cfg, ["input.id_column=doc_id", "index.partition_by=lang"], schema=ReindexJobConfig)


def test_a_second_reindex_is_refused_by_the_index_lock(tmp_path, tiny_embedding_model):
    from pipelines.reindex.job import run_reindex

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"doc_id": ["a"], "text": ["hello"]}), corpus / "p.parquet")
    cfg = ReindexJobConfig.model_validate({
        "input": {"paths": [str(corpus)], "id_column": "doc_id"}, "model": {"path": str(tiny_embedding_model)},
        "index": {"path": str(tmp_path / "idx")}})
    with OutputLock(Storage(str(tmp_path / "idx")), 600):
        with pytest.raises(OutputError, match="being written by another job"):
            run_reindex(cfg, stream=io.StringIO())
    assert not (tmp_path / "idx" / "v000001").exists()


def test_versions_and_gc_commands(tmp_path, capsys):
    from pipelines.cli import main

    storage = Storage(str(tmp_path / "idx"))
    for name, text in {"v000001/_job.json": '{"items": []}', "v000001/_SUCCESS": '{"rows": 5}',
                       "v000001/_reindex.json": '{"base": null, "counts": {"new": 5, "deleted": 0}}',
                       "v000001/data/x.parquet": "x", "v000002/_reindex.json": '{"base": "v000001"}',
                       CURRENT_FILE: '{"version": "v000001"}'}.items():
        storage.write_bytes(name, text.encode())
    assert main(["versions", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "v000001  current  rows=5  base=-  new=5 deleted=0"
    assert out[1].startswith("v000002  unpublished") and "rows=?  base=v000001" in out[1]
    assert main(["gc", str(tmp_path / "idx"), "--keep", "1"]) == 0
    assert "collected 0 version(s), deleted 0 file(s)" in capsys.readouterr().out
    assert storage.exists("v000001/data/x.parquet")  # the current version is always kept
    assert main(["gc", str(tmp_path / "idx"), "--keep", "0"]) == 2
    assert "gc --keep must be at least 1" in capsys.readouterr().err


def test_gc_refuses_when_the_current_version_cannot_be_read(tmp_path):
    """gc --keep 1 on an index whose current version lost its _SUCCESS (deleted by hand, or by a late writer
    before this release) deletes nothing and says why: it never collects versions against a pointer it cannot
    follow."""
    store = Storage(str(tmp_path / "idx"))
    for name in ("v000001", "v000002"):
        store.write_bytes(f"{name}/_job.json", b'{"fingerprint_id": "fp"}')
        store.write_bytes(f"{name}/_SUCCESS", b"{}")
        store.write_bytes(f"{name}/data/x.parquet", b"x")
    store.write_bytes(CURRENT_FILE, b'{"version": "v000002"}')
    store.delete(["v000002/_SUCCESS"])
    before = store.list_files("")
    with OutputLock(store, 600):
        with pytest.raises(OutputError, match="refusing to gc: the current version v000002 cannot be read"):
            IndexRoot(store).gc(1, io.StringIO())
    assert [f for f in store.list_files("") if f != "_lock.json"] == [f for f in before if f != "_lock.json"]
