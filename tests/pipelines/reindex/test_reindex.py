"""Scheduled reindexing over three snapshots (adds, edits, deletes) on a real S3 server and local Ray.

The expected counts come from a plain dict diff of the snapshots (the oracle); the final version is compared
with a full backfill of the last snapshot, bit for bit. Each row is embedded alone
(`max_batch_tokens: 1`) so that a vector depends on its text only, not on which rows shared its batch:
otherwise a carried vector (computed beside other rows, snapshots ago) and a recomputed one may differ in
the last bit of fp32 with no error anywhere.

The index is also published as an Iceberg table (`index.table`: a SQL catalog on SQLite, warehouse in the bucket):
each version a tagged snapshot with time travel to each, the killed attempt publishing nothing, gc expiring
the dropped versions' snapshots, and the table's vector properties following a re-embed to new dimensions.
"""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.config import TableConfig
from pipelines.output.lock import OutputLock
from pipelines.output.reader import committed_files, read_committed
from pipelines.output.status import format_status, job_status
from pipelines.output.table import VERSION, expire_index_versions, open_catalog
from pipelines.output.verify import verify_output
from pipelines.reindex.config import ReindexJobConfig
from pipelines.reindex.index import IndexRoot
from pipelines.reindex.job import run_reindex
from pipelines.storage import Storage

pytestmark = pytest.mark.integration


def _text(doc: str, edit: int = 0) -> str:
    n = int(doc[1:])
    return f"{doc} about {'alpha beta gamma '[: 6 + n % 11]} " + "word " * (n % 7) + ("edited " * edit)


def snapshots() -> list[dict[str, dict[str, str]]]:
    """Three snapshots: file → {id: text}. An empty text is rejected, never indexed."""
    a = {f"a{i}": _text(f"a{i}") for i in range(40)}
    b = {f"b{i}": _text(f"b{i}") for i in range(40)}
    b["b30"] = "   "
    c = {f"c{i}": _text(f"c{i}") for i in range(40)}
    s1 = {"a": a, "b": b, "c": c}
    b2 = {k: (_text(k, 1) if k in ("b3", "b7", "b11") else v) for k, v in b.items() if k not in ("b20", "b21")}
    s2 = {"a": a, "b": b2, "c": c, "d": {f"d{i}": _text(f"d{i}") for i in range(10)}}
    a3 = {k: v for k, v in a.items() if k not in {f"a{i}" for i in range(5)}}
    a3.update({f"a{i}": _text(f"a{i}", 2) for i in range(40, 44)})
    a3["c5"] = c["c5"]  # moved to another file, same text: unchanged
    c3 = {k: (_text(k, 1) if k in ("c10", "c12") else v) for k, v in c.items() if k != "c5"}
    return [s1, s2, {"a": a3, "b": b2, "c": c3}]


def live(snapshot: dict[str, dict[str, str]]) -> dict[str, str]:
    return {k: v for docs in snapshot.values() for k, v in docs.items() if v.strip()}


def oracle(before: dict[str, str], after: dict[str, str]) -> dict[str, int]:
    return {"new": len(after.keys() - before.keys()), "deleted": len(before.keys() - after.keys()),
            "changed": sum(1 for k in after.keys() & before.keys() if after[k] != before[k]),
            "unchanged": sum(1 for k in after.keys() & before.keys() if after[k] == before[k])}


def upload(fs, bucket: str, name: str, snapshot: dict[str, dict[str, str]]) -> str:
    for file, docs in snapshot.items():
        buf = io.BytesIO()
        pq.write_table(pa.table({"doc_id": list(docs), "text": list(docs.values())}), buf, row_group_size=20)
        fs.pipe(f"{bucket}/{name}/{file}.parquet", buf.getvalue())
    return f"s3://{bucket}/{name}/*.parquet"


def job(paths: str, index: str, opts: dict, model: str, table: dict | None = None, **model_over) -> dict:
    return {"input": {"paths": [paths], "id_column": "doc_id", "rows_per_item": 20, "storage_options": opts},
            "model": {"path": model, "max_length": 32, "max_batch_tokens": 1, **model_over},
            "index": {"path": index, "diff_partitions": 2, **({"table": table} if table else {})},
            "compute": {"batch_rows": 32}, "run": {"progress_interval_s": 1}}


def reindex(spec: dict) -> tuple[dict, str]:
    log = io.StringIO()
    summary = run_reindex(ReindexJobConfig.model_validate(spec), stream=log)
    return summary, log.getvalue()


def by_id(table: pa.Table) -> pa.Table:
    return table.sort_by("id")


def vectors(table: pa.Table) -> np.ndarray:
    emb = table.column("embedding").combine_chunks()
    return emb.values.to_numpy().reshape(len(emb), -1)


def test_three_snapshots_embed_only_what_changed_and_publish_atomically(
        ray_local, s3_server, s3_bucket, tiny_embedding_model, tmp_path, capsys):
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    snaps = snapshots()
    paths = [upload(fs, bucket, f"snap{n + 1}", s) for n, s in enumerate(snaps)]
    index_url = f"s3://{bucket}/index"
    index = IndexRoot(Storage(index_url, opts))
    model = str(tiny_embedding_model)
    table_cfg = {"name": "idx", "catalog": {"name": "idx", "properties": {
        "type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"s3://{bucket}/warehouse"}}}

    def iceberg():
        return open_catalog(TableConfig.model_validate(table_cfg), index.storage).load_table("embedrank.idx")

    def ids_at(version: str | None) -> list[str]:
        """The ids the table reads at a version's tag (None: its current snapshot)."""
        t = iceberg()
        snap = t.snapshot_by_name(version) if version else t.current_snapshot()
        assert snap is not None, version
        return sorted(t.scan(snapshot_id=snap.snapshot_id).to_arrow().column("id").to_pylist())

    # snapshot 1: the first version embeds every live document
    s1, log = reindex(job(paths[0], index_url, opts, model, table_cfg))
    assert s1["published"] == "v000001" and s1["embedded_rows"] == len(live(snaps[0])) == 119, log
    assert s1["counts"]["new"] == 119 and s1["counts"]["rejected"] == 1

    # snapshot 2: 10 new, 3 edited, 2 deleted; files a and c are byte-identical, so kept by reference
    s2, log = reindex(job(paths[1], index_url, opts, model, table_cfg))
    expected2 = oracle(live(snaps[0]), live(snaps[1]))
    assert {k: s2["counts"][k] for k in expected2} == expected2 == {"new": 10, "deleted": 2, "changed": 3,
                                                                    "unchanged": 114}
    assert s2["embedded_rows"] == expected2["new"] + expected2["changed"], log
    assert s2["items_by_reference"] == 4 and s2["carried_rows"] == expected2["unchanged"]
    v2 = by_id(read_committed(index_url, opts))
    assert v2.column("id").to_pylist() == sorted(live(snaps[1]))
    assert "new 10 · changed 3 · unchanged 114 · deleted 2 · rejected 1" in log
    assert ids_at("v000002") == ids_at(None) == sorted(live(snaps[1]))  # the table: v2 current, tagged,
    assert ids_at("v000001") == sorted(live(snaps[0]))  # and time travel to v1
    assert iceberg().snapshot_by_name("v000002").summary[VERSION] == "v000002"

    # snapshot 3, first attempt killed after its diff and its 2 by-reference commits, while a reader polls
    # (a kill half way through the build resumes through the same commit loop: test_crash_recovery)
    cfg_file = tmp_path / "reindex3.yaml"
    import ray  # the killed driver joins this session's Ray instead of starting its own

    spec = job(paths[2], index_url, opts, model, table_cfg)
    spec["run"]["ray_address"] = ray.get_runtime_context().gcs_address
    cfg_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "EMBEDRANK_"))}
    env.update(EMBEDRANK_FAILPOINTS="after_commit_write@2")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "reindex", str(cfg_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    reads = 0
    while proc.poll() is None:
        seen = by_id(read_committed(index_url, opts))
        assert seen.column("id").equals(v2.column("id")) and np.array_equal(vectors(seen), vectors(v2))
        reads += 1
        time.sleep(2.0)
    err = proc.communicate()[1]
    assert proc.returncode == 137 and reads > 0, err[-3000:]
    assert index.current()["version"] == "v000002"
    assert len(index.version_root("v000003").commit_ids()) == 2
    status = job_status(index_url, opts)
    assert (status["version"], status["current_version"], status["items_committed"]) == ("v000003", "v000002", 2)
    assert status["state"].startswith("stopped") and "building v000003 (current: v000002)" in format_status(status)
    assert by_id(read_committed(index_url, opts)).equals(v2)
    assert iceberg().snapshot_by_name("v000003") is None and ids_at(None) == sorted(live(snaps[1]))

    s3, log = reindex(job(paths[2], index_url, opts, model, table_cfg))
    expected3 = oracle(live(snaps[1]), live(snaps[2]))
    assert {k: s3["counts"][k] for k in expected3} == expected3 == {"new": 4, "deleted": 15, "changed": 2,
                                                                    "unchanged": 110}
    assert s3["resumed"] and s3["published"] == "v000003", log
    assert s3["embedded_rows_in_version"] == expected3["new"] + expected3["changed"]
    assert s3["embedded_rows"] <= s3["embedded_rows_in_version"] and "resuming v000003" in log
    assert verify_output(index_url, opts).ok

    # the published version equals a full backfill of snapshot 3: same ids, the same fp32 bits
    full = EmbedJobConfig.model_validate({**{k: v for k, v in job(paths[2], "", opts, model).items()
                                             if k != "index"}, "output": {"path": f"s3://{bucket}/full3"}})
    started = time.perf_counter()
    full_summary = run_embed(full, stream=io.StringIO())
    full_s = time.perf_counter() - started
    expected = by_id(read_committed(f"s3://{bucket}/full3", opts))
    got = by_id(read_committed(index_url, opts))
    assert got.column("id").to_pylist() == sorted(live(snaps[2]))
    assert got.column("id").equals(expected.column("id"))
    assert np.array_equal(vectors(got), vectors(expected))
    for column in ("n_tokens", "truncated"):
        assert got.column(column).equals(expected.column(column))
    through_table = by_id(iceberg().scan().to_arrow())
    assert through_table.column("id").equals(got.column("id")) and np.array_equal(vectors(through_table),
                                                                                   vectors(got))
    assert ids_at("v000003") == sorted(live(snaps[2])) and ids_at("v000001") == sorted(live(snaps[0]))
    assert sorted(t.file.file_path for t in iceberg().scan().plan_files()) == sorted(committed_files(index_url, opts))

    # versions and gc: v3 still names files of v2 (file b, unchanged since snapshot 2), so gc keeps exactly those
    states = {r["version"]: r["state"] for r in index.describe()}
    assert states == {"v000001": "previous", "v000002": "previous", "v000003": "current"}
    named_in_v2 = {p for p in index.named_files("v000003") if p.startswith("v000002/")}
    assert named_in_v2 and not {p for p in index.named_files("v000003") if p.startswith("v000001/")}
    with OutputLock(index.storage, 30):  # as `embedrank gc` does: the table is expired by the lock's holder
        index.gc(1, io.StringIO(), before_delete=lambda dropped: expire_index_versions(index.storage, dropped))
    assert iceberg().snapshot_by_name("v000001") is None and iceberg().snapshot_by_name("v000002") is None
    assert {s.summary[VERSION] for s in iceberg().snapshots()} == {"v000003"}
    assert ids_at("v000003") == ids_at(None) == sorted(live(snaps[2]))  # every file it names is still there
    assert index.storage.list_files("v000001") == []
    after_gc = {r["version"]: r["state"].split()[0] for r in index.describe()}
    assert after_gc.pop("v000003") == "current" and after_gc.get("v000002") == "collected"
    assert set(after_gc.values()) == {"collected"}  # v000001 is gone, or an empty folder where a store keeps one
    assert set(index.storage.list_files("v000002")) == named_in_v2
    assert by_id(read_committed(index_url, opts)).equals(got) and verify_output(index_url, opts).ok

    # a new model setting re-embeds everything, said clearly; a second identical run publishes nothing
    s4, log = reindex(job(paths[2], index_url, opts, model, table_cfg, dimensions=32))
    assert s4["full_reembed"] and "FULL RE-EMBED" in log and "dimensions" in log
    assert s4["embedded_rows"] == len(live(snaps[2])) == s4["counts"]["reembedded"]
    assert s4["counts"]["base_rows"] == len(live(snaps[2])) and "full re-embed 116" in log
    assert vectors(read_committed(index_url, opts)).shape == (len(live(snaps[2])), 32)
    table4 = iceberg()
    assert vectors(by_id(table4.scan().to_arrow())).shape == (len(live(snaps[2])), 32)
    assert table4.properties["embedrank.dimensions"] == "32" and "32 x float" in table4.schema().find_field(
        "embedding").doc and "FLOAT[32]" in table4.properties["embedrank.cast.embedding.duckdb"]
    assert ids_at("v000004") == sorted(live(snaps[2]))
    s5, log = reindex(job(paths[2], index_url, opts, model, table_cfg, dimensions=32))
    assert s5["published"] is None and "nothing changed since v000004" in log
    assert index.current()["version"] == "v000004"
    # its attempt is tombstoned (numbers are never reused): only the tombstone is left of it
    assert index.versions()[-1] == "v000005" and index.is_discarded("v000005")
    assert index.storage.list_files("v000005") == ["v000005/_reindex.json"]
    assert iceberg().snapshot_by_name("v000005") is None and iceberg().current_snapshot().summary[VERSION] == \
        "v000004" and sorted(t.file.file_path for t in iceberg().scan().plan_files()) == sorted(
            committed_files(index_url, opts))
    with capsys.disabled():
        print(f"\nrows embedded: v1 {s1['embedded_rows']}, v2 {s2['embedded_rows']} (counts {s2['counts']}), v3 "
              f"{s3['embedded_rows_in_version']} over the killed run and the resume (counts {s3['counts']}); "
              f"wall: v1 {s1['wall_s']:.1f}s, v2 {s2['wall_s']:.1f}s, v3 resume {s3['wall_s']:.1f}s, full backfill "
              f"of snapshot 3 {full_s:.1f}s ({full_summary['totals']['rows']} rows), full re-embed v4 {s4['wall_s']:.1f}s")
