"""The embedding backfill end to end on local Ray against the real S3 server on 127.0.0.1."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import OutputError
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import read_committed
from pipelines.output.root import COMMITS_DIR, OutputRoot
from pipelines.output.verify import verify_output
from pipelines.storage import Storage

pytestmark = pytest.mark.integration

WORDS = "ray data streams blocks to actors that embed sorted batches under a token budget".split()


def corpus_rows(shard, n, seed):
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 60)))) for _ in range(n)]
    ids = [f"s{shard}-{i}" for i in range(n)]
    return ids, texts


def job(input_paths, output, storage_options, model, fmt="parquet", input_extra=None, **model_extra):
    return EmbedJobConfig.model_validate({
        "input": {"paths": input_paths, "format": fmt, "id_column": "doc_id", "text_column": "text",
                  "passthrough_columns": ["lang"], "rows_per_item": 60, "storage_options": storage_options,
                  **(input_extra or {})},
        "model": {"path": str(model), "max_length": 48, "max_batch_tokens": 2048, **model_extra},
        "output": {"path": output},
        "compute": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1, "batch_rows": 50},
        "run": {"progress_interval_s": 0.5},
    })


def reference_vectors(model, texts, dims=None):
    from actors.embedder import Embedder
    from actors.tokenize import TextTokenizer, ids_to_arrow

    ids, _ = TextTokenizer(str(model), None, 48, None).encode(texts)
    arr = ids_to_arrow(ids)
    return Embedder(str(model), dtype="float32", dimensions=dims).embed_ids(arr.values.to_numpy(),
                                                                            arr.offsets.to_numpy())


@pytest.fixture
def parquet_corpus(s3_bucket, s3_server):
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    expected_good, expected_bad = {}, {}
    for shard, n in enumerate([150, 130, 10]):
        ids, texts = corpus_rows(shard, n, shard)
        if shard == 0:
            texts[3], texts[77] = None, "   "
        for i, t in zip(ids, texts):
            (expected_good if t and t.strip() else expected_bad)[i] = t
        table = pa.table({"doc_id": ids, "text": pa.array(texts, pa.string()),
                          "lang": ["en" if i % 2 else "de" for i in range(n)]})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=40)
        fs.pipe(f"{bucket}/corpus/part-{shard}.parquet", buf.getvalue())
    return bucket, opts, expected_good, expected_bad


def test_parquet_backfill_s3_to_s3_resume_and_refusal(ray_local, parquet_corpus, tiny_embedding_model, s3_server,
                                                     monkeypatch):
    bucket, opts, good, bad = parquet_corpus
    out = f"s3://{bucket}/vectors/v1"
    cfg = job([f"s3://{bucket}/corpus/*.parquet"], out, opts, tiny_embedding_model)

    first = run_embed(cfg)
    assert first["items_processed"] == first["items_total"] == 5
    assert first["totals"]["rows"] == len(good) and first["totals"]["rejected"] == len(bad) == 2
    assert first["totals"]["reject_reasons"] == {"empty_text": 1, "null_text": 1}
    # where the first minute went: the session's Ray was up before the job; the replica reported its start
    phases = first["startup"]
    assert (phases["ray"], phases["ray_s"], phases["replicas_reported"]) == ("connected", 0.0, 1)
    assert phases["replica_imports_s"] > 0 and phases["replica_load_s"] > 0
    assert 0 < phases["replica_ready_s"] <= phases["replica_first_batch_s"] <= phases["first_item_s"] \
        <= phases["wall_s"]

    report = verify_output(out, opts)
    assert report.ok, report.problems
    assert report.counts["unique_ids"] == len(good) + len(bad) and report.counts["orphans"] == 0

    table = read_committed(out, opts)
    assert sorted(table.column("id").to_pylist()) == sorted(good)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert table.column("lang").to_pylist()[:2] == ["de", "en"]
    fingerprint = json.loads(table.schema.metadata[b"embedrank.fingerprint"])
    assert fingerprint["model"] == str(tiny_embedding_model) and fingerprint["dimensions"] is None
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    want = reference_vectors(tiny_embedding_model, [good[i] for i in table.column("id").to_pylist()])
    assert np.abs(vectors - want).max() <= 1e-5
    assert table.column("truncated").to_pylist().count(True) > 0

    rejects = read_committed(out, opts, rejects=True)
    assert dict(zip(rejects.column("id").to_pylist(), rejects.column("reason").to_pylist())) == {
        "s0-3": "null_text", "s0-77": "empty_text"}

    fs = s3_server.filesystem()
    commits = sorted(fs.ls(f"{bucket}/vectors/v1/{COMMITS_DIR}"))
    first_commit = json.loads(fs.cat(commits[0]))
    df = pd.concat([pd.read_parquet(f"s3://{bucket}/vectors/v1/{f['path']}", storage_options=opts)
                    for f in first_commit["files"]])
    assert len(df) == first_commit["rows"] and df["embedding"].map(len).eq(64).all()

    data_before = {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/vectors/v1/data")}
    again = run_embed(cfg)
    assert again["items_processed"] == 0 and again["items_skipped"] == 5
    assert again["startup"]["first_item_s"] is None and again["startup"]["replicas_reported"] == 0
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/vectors/v1/data")} == data_before

    dropped = [json.loads(fs.cat(c))["item"] for c in commits[2:4]]
    fs.rm(commits[2:4])
    fs.pipe(f"{bucket}/vectors/v1/data/orphan-0-0-abc.parquet", b"left by a crash")
    # the resume sized for a cluster whose autoscaler adds nodes (as the session's Ray were one): its model pool
    # asks at once for what the 2 items left can use, not for what the 5 planned could (3 replicas' nodes)
    import dataclasses

    import pipelines.lifecycle as lifecycle

    real_view = lifecycle.view_for_job
    monkeypatch.setattr(lifecycle, "view_for_job",
                        lambda *a, **k: dataclasses.replace(real_view(*a, **k), autoscaler="types"))
    wider = cfg.model_copy(update={"compute": cfg.compute.model_copy(update={"max_replicas": 3, "num_cpus": 0.5})})
    said = io.StringIO()
    resumed = run_embed(wider, stream=said)
    monkeypatch.undo()
    assert resumed["items_processed"] == 2 and resumed["items_skipped"] == 3
    assert "the model pool asks for 2 replica(s) at once (min_replicas 1 -> 2; 2 item(s) to process, " \
           "max_replicas 3)" in said.getvalue(), said.getvalue()
    assert sorted(json.loads(fs.cat(c))["item"] for c in sorted(fs.ls(f"{bucket}/vectors/v1/{COMMITS_DIR}"))
                  if json.loads(fs.cat(c))["item"] in dropped) == sorted(dropped)
    assert not fs.exists(f"{bucket}/vectors/v1/data/orphan-0-0-abc.parquet")
    assert verify_output(out, opts).ok
    assert sorted(read_committed(out, opts).column("id").to_pylist()) == sorted(good)

    changed = job([f"s3://{bucket}/corpus/*.parquet"], out, opts, tiny_embedding_model, dimensions=32)
    with pytest.raises(OutputError, match=r"dimensions: None → 32"):
        run_embed(changed)


def test_jsonl_corpus_with_bad_lines_and_an_empty_file(ray_local, s3_bucket, s3_server, tiny_embedding_model):
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    ids, texts = corpus_rows(9, 40, 9)
    lines = [json.dumps({"doc_id": i, "text": t, "lang": "en"}).encode() for i, t in zip(ids, texts)]
    lines[5] = b"{broken"
    lines[6] = json.dumps({"doc_id": "s9-6", "text": 42, "lang": "en"}).encode()
    lines[7] = b'{"doc_id": "s9-7", "text": "caf\xe9 latin-1, not UTF-8", "lang": "en"}'
    lines[8] = json.dumps({"doc_id": "s9-8", "text": None, "lang": "en"}).encode()
    lines[9] = b'["an", "array"]'
    data = b"\n".join(lines) + b"\n"
    fs.pipe(f"{bucket}/docs/a.jsonl", data)
    fs.pipe(f"{bucket}/docs/empty.jsonl", b"")
    out = f"s3://{bucket}/vectors/jsonl"
    cut = {"jsonl_item_mb": len(data) / 3.5 / (1 << 20)}  # a.jsonl: 4 byte ranges, each its own work item
    summary = run_embed(job([f"s3://{bucket}/docs/*.jsonl"], out, opts, tiny_embedding_model, fmt="jsonl",
                            input_extra=cut))
    assert summary["items_processed"] == 5
    assert summary["totals"]["rows"] == 35 and summary["totals"]["reject_reasons"] == {
        "invalid_json": 1, "invalid_utf8": 1, "not_an_object": 1, "null_text": 1, "text_not_string": 1}
    report = verify_output(out, opts)
    assert report.ok, report.problems
    got = read_committed(out, opts)
    assert sorted(got.column("id").to_pylist()) == sorted(i for k, i in enumerate(ids) if k not in range(5, 10))
    rejects = read_committed(out, opts, rejects=True)
    # a reject's row counts lines within its item: the items before it in the file give the line's number
    commits = OutputRoot(Storage(out, opts)).read_planned_commits()
    items = [i for i in OutputRoot(Storage(out, opts)).read_job()["items"] if i["rel"] == "a.jsonl"]
    assert len(items) == 4 and all(i["byte_start"] is not None for i in items)
    first_line = dict(zip([i["item_id"] for i in items],
                          np.cumsum([0] + [commits[i["item_id"]].row_end for i in items[:-1]]).tolist()))
    found = zip(*(rejects.column(c).to_pylist() for c in ("item", "row", "reason")))
    assert sorted((first_line[item] + row, reason) for item, row, reason in found) == [
        (5, "invalid_json"), (6, "text_not_string"), (7, "invalid_utf8"), (8, "null_text"), (9, "not_an_object")]
