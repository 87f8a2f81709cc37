"""Index roots without Ray: version names, rebased references, attempts, the pointer, the lock, config rules."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import OutputError
from pipelines.config import ConfigError, load_config
from pipelines.output.lock import OutputLock
from pipelines.reindex.config import ReindexJobConfig
from pipelines.reindex.index import CURRENT_FILE, IndexRoot, rebase, version_name, version_number
from pipelines.reindex.stages import content_hashes, count_changes
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
    assert other == "v000001" and not index.storage.exists("v000001/_commits/a.json")
    assert "discarding unpublished v000001 (2 file(s))" in log.getvalue()
    with pytest.raises(OutputError, match="no _SUCCESS"):
        index.publish("v000001", {})
    assert index.current() is None and not index.storage.exists(CURRENT_FILE)


def test_content_hash_depends_on_text_and_fingerprint():
    a = content_hashes(pa.array(["x", "y", None, "x"]), "fp1").to_pylist()
    b = content_hashes(pa.array(["x"]), "fp2").to_pylist()
    assert a[0] == a[3] != a[1] and a[2] is None and b[0] != a[0] and len(a[0]) == 32


def test_change_counts_of_a_full_outer_join():
    joined = pa.table({
        "id": ["n", "c", "u", "d", None],
        "content_hash": ["1", "2", "3", None, None],
        "_rejected": [False, False, False, None, True],
        "_in_snapshot": [True, True, True, None, True],
        "_base_hash": [None, "9", "3", "4", None],
        "_in_base": [None, True, True, True, None],
    })
    assert count_changes(joined).to_pylist() == [{"new": 1, "changed": 1, "unchanged": 1, "deleted": 1,
                                                  "rejected": 1}]


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
