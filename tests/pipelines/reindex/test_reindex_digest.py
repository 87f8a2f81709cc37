"""Items kept by content digest, and the per-file carry, on local disk and the session's Ray.

Snapshot 2 renames file a (same bytes), re-exports file b (the same rows in other bytes: zstd instead of
snappy, row groups of 5 instead of 10, each item's rows in reverse order; items are cut at 10 rows either way),
edits c3 and moves c15 from file c to a new file d. The renamed and re-exported items are kept by reference
through their digests (no row of theirs read by the build, none embedded; b's vectors are v1's bit for bit);
c's items are rebuilt carrying their unchanged vectors from c's own base files; c15 carries its vector from c's
base file into d's item. Counts come from a plain dict diff (the oracle); the version equals a full re-embed of
snapshot 2 bit for bit (each row embedded alone, `max_batch_tokens: 1`, see test_reindex.py). Snapshot 3 renames
every file of snapshot 2: nothing changed, and the digests say so without any diff task.
"""

import io
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import read_committed
from pipelines.output.verify import verify_output
from pipelines.reindex.config import ReindexJobConfig
from pipelines.reindex.index import IndexRoot
from pipelines.reindex.job import run_reindex
from pipelines.storage import Storage

pytestmark = pytest.mark.integration


def _text(doc: str, edit: bool = False) -> str:
    n = int(doc[1:])
    return f"{doc} is about " + "word " * (n % 5) + ("edited" if edit else "")


def write(folder, files: dict[str, list[str]], texts: dict[str, str]) -> str:
    folder.mkdir()
    for name, ids in files.items():
        pq.write_table(pa.table({"doc_id": ids, "text": [texts[i] for i in ids]}), folder / f"{name}.parquet",
                       row_group_size=10)
    return str(folder / "*.parquet")


def spec(paths: str, model) -> dict:
    return {"input": {"paths": [paths], "id_column": "doc_id", "rows_per_item": 10},
            "model": {"path": str(model), "max_length": 32, "max_batch_tokens": 1},
            "compute": {"batch_rows": 16}, "run": {"progress_interval_s": 60}}


def reindex(paths: str, index: str, model) -> tuple[dict, str]:
    log = io.StringIO()
    summary = run_reindex(ReindexJobConfig.model_validate({**spec(paths, model), "index": {"path": index}}),
                          stream=log)
    return summary, log.getvalue()


def vectors(table: pa.Table) -> np.ndarray:
    emb = table.column("embedding").combine_chunks()
    return emb.values.to_numpy().reshape(len(emb), -1)


def test_renamed_and_reexported_files_are_kept_by_digest_and_moved_documents_carry(
        ray_local, tiny_embedding_model, tmp_path):
    docs = {f"{f}{i}": _text(f"{f}{i}") for f in "abc" for i in range(20)}
    s1 = {"a": [f"a{i}" for i in range(20)], "b": [f"b{i}" for i in range(20)], "c": [f"c{i}" for i in range(20)]}
    snap1 = write(tmp_path / "snap1", s1, docs)
    index_url = str(tmp_path / "index")
    v1, log = reindex(snap1, index_url, tiny_embedding_model)
    assert v1["published"] == "v000001" and v1["embedded_rows"] == 60, log
    before = read_committed(index_url).sort_by("id")

    docs2 = {**docs, "c3": _text("c3", edit=True), **{f"d{i}": _text(f"d{i}") for i in range(5)}}
    (tmp_path / "snap2").mkdir()
    shutil.copy(tmp_path / "snap1" / "a.parquet", tmp_path / "snap2" / "a-renamed.parquet")  # same bytes, new name
    # b re-exported: the same rows, other compression, other row groups, each item's rows in another order
    b2 = s1["b"][:10][::-1] + s1["b"][10:][::-1]
    pq.write_table(pa.table({"doc_id": b2, "text": [docs[i] for i in b2]}), tmp_path / "snap2" / "b.parquet",
                   row_group_size=5, compression="zstd")
    old_b, new_b = (pq.ParquetFile(tmp_path / snap / "b.parquet") for snap in ("snap1", "snap2"))
    assert (tmp_path / "snap1" / "b.parquet").read_bytes() != (tmp_path / "snap2" / "b.parquet").read_bytes()
    assert (old_b.metadata.num_row_groups, new_b.metadata.num_row_groups) == (2, 4)
    assert {old_b.metadata.row_group(0).column(0).compression, new_b.metadata.row_group(0).column(0).compression} \
        == {"SNAPPY", "ZSTD"}
    assert old_b.read().column("doc_id").to_pylist() != new_b.read().column("doc_id").to_pylist()
    c2 = [d for d in s1["c"] if d != "c15"]
    for name, ids in {"c": c2, "d": [f"d{i}" for i in range(5)] + ["c15"]}.items():
        pq.write_table(pa.table({"doc_id": ids, "text": [docs2[i] for i in ids]}),
                       tmp_path / "snap2" / f"{name}.parquet", row_group_size=10)
    snap2 = str(tmp_path / "snap2" / "*.parquet")

    v2, log = reindex(snap2, index_url, tiny_embedding_model)
    live1, live2 = docs, {i: docs2[i] for ids in (s1["a"], s1["b"], c2, [f"d{i}" for i in range(5)] + ["c15"])
                          for i in ids}
    oracle = {"new": len(live2.keys() - live1.keys()), "deleted": len(live1.keys() - live2.keys()),
              "changed": sum(1 for k in live2.keys() & live1.keys() if live1[k] != live2[k]),
              "unchanged": sum(1 for k in live2.keys() & live1.keys() if live1[k] == live2[k])}
    assert oracle == {"new": 5, "deleted": 0, "changed": 1, "unchanged": 59}
    assert {k: v2["counts"][k] for k in oracle} == oracle, log
    assert v2["published"] == "v000002" and v2["items_by_digest"] == 4 and v2["items_by_reference"] == 4, log
    assert v2["embedded_rows"] == 6 and v2["carried_rows"] == 59, log  # d0..d4 and c3 only
    assert "4 by content digest" in log and "time by phase: plan" in log
    assert set(v2["phases"]) == {"plan", "base", "digest", "diff", "build", "close", "publish"}

    index = IndexRoot(Storage(index_url))
    commits = index.version_root("v000002").read_commits()
    by_source: dict[str, list] = {}
    for c in commits.values():
        by_source.setdefault(c.source, []).append(c)
    for name in ("a-renamed.parquet", "b.parquet"):  # kept: the new items' records name v1's files, nothing embedded
        assert [(c.carried_from, c.rows, c.carried) for c in by_source[name]] == [("v000001", 10, 10)] * 2
        assert all(f.path.startswith("../v000001/data/") for c in by_source[name] for f in c.files)
    # c rebuilt, its unchanged documents carried from c's own base files; d carries the moved c15
    assert sorted((c.rows, c.carried, c.carried_from) for c in by_source["c.parquet"]) == [(9, 9, None),
                                                                                          (10, 9, None)]
    assert [(c.rows, c.carried) for c in by_source["d.parquet"]] == [(6, 1)]
    assert verify_output(index_url).ok
    # the re-exported b's rows are v1's rows: the same ids, vectors bit for bit, token counts
    b_ids = pa.array(sorted(s1["b"]))
    now = read_committed(index_url).sort_by("id")
    kept_b, was_b = (t.filter(pc.is_in(t.column("id"), b_ids)) for t in (now, before))
    assert kept_b.column("id").to_pylist() == sorted(s1["b"]) == was_b.column("id").to_pylist()
    assert vectors(kept_b).tobytes() == vectors(was_b).tobytes()
    assert kept_b.column("n_tokens").equals(was_b.column("n_tokens"))
    digests = index.digests("v000002")
    assert set(digests) == set(commits) and len(set(digests.values())) == 7

    full_url = str(tmp_path / "full")
    run_embed(EmbedJobConfig.model_validate({**spec(snap2, tiny_embedding_model), "output": {"path": full_url}}),
              stream=io.StringIO())
    got, want = read_committed(index_url).sort_by("id"), read_committed(full_url).sort_by("id")
    assert got.column("id").to_pylist() == sorted(live2) and got.column("id").equals(want.column("id"))
    assert np.array_equal(vectors(got), vectors(want))
    for column in ("n_tokens", "truncated"):
        assert got.column(column).equals(want.column(column))

    # every file renamed: each item is recognised by its digest; nothing to diff, nothing published
    (tmp_path / "snap3").mkdir()
    for f in (tmp_path / "snap2").glob("*.parquet"):
        shutil.copy(f, tmp_path / "snap3" / f"renamed-{f.name}")
    v3, log = reindex(str(tmp_path / "snap3" / "*.parquet"), index_url, tiny_embedding_model)
    assert v3["published"] is None and "nothing changed since v000002" in log, log
    assert v3["items_by_digest"] == 7 and v3["counts"]["unchanged"] == 65
    assert index.current()["version"] == "v000002"
