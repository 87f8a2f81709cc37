"""Reranking end to end on local Ray against the real S3 server: flat pairs and doc-id + documents. The flat-pairs
job also publishes its final ranks and rejects as Iceberg tables (`output.table`)."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.faulty_proxy import FAULT_KINDS, FaultyProxy

from pipelines.output.reader import committed_files, read_committed
from pipelines.output.root import COMMITS_DIR, RANK_COMMITS_DIR
from pipelines.output.verify import verify_output
from pipelines.rerank.config import RerankJobConfig
from pipelines.rerank.job import run_rerank

pytestmark = pytest.mark.integration

WORDS = "ray reranks candidate documents for each query with a small random qwen model".split()
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def text(rng, lo=3, hi=40):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def put(fs, path, table):
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=15)
    fs.pipe(path, buf.getvalue())


def job(inp, out, opts, model, documents=None, top_k=None, rank_buckets=4, table=None):
    return RerankJobConfig.model_validate({
        "input": {"paths": inp, "rows_per_item": 20, "storage_options": opts,
                  **({"text_column": None} if documents else {})},
        **({"documents": {"paths": documents, "storage_options": opts, "join_partitions": 4}} if documents else {}),
        "model": {"path": str(model), "max_length": 96, "max_batch_tokens": 2048, "instruction": INSTRUCTION},
        "output": {"path": out, "top_k": top_k, "rank_buckets": rank_buckets, **({"table": table} if table else {})},
        "compute": {"batch_rows": 32},
        "run": {"progress_interval_s": 0.5},
    })


def reference_scores(model, pairs):
    from actors.reranker import PairTokenizer, Reranker

    ids, _ = PairTokenizer(str(model), None, 96, INSTRUCTION).encode([q for q, _ in pairs], [d for _, d in pairs])
    return Reranker(str(model), dtype="float32", share_prefix=False).score_ids(ids)


def check_ranks(table, top_k=None):
    by_query = {}
    for r in table.to_pylist():
        by_query.setdefault(r["query_id"], []).append(r)
    for rows in by_query.values():
        ranks = sorted(r["rank"] for r in rows)
        assert ranks == list(range(1, len(rows) + 1))
        assert top_k is None or len(rows) <= top_k
        ordered = sorted(rows, key=lambda r: r["rank"])
        assert all(a["score"] >= b["score"] for a, b in zip(ordered, ordered[1:]))
    return by_query


def test_flat_pairs_across_shards_rank_per_query_and_resume(ray_local, s3_bucket, s3_server, tiny_reranker_model,
                                                          tmp_path):
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    rng = np.random.default_rng(0)
    queries = {f"q{i}": text(rng, 2, 8) for i in range(6)}
    docs = {f"d{i}": text(rng) for i in range(40)}
    expected = {}
    for shard in range(3):
        rows = [(q, d) for q in queries for d in rng.choice(list(docs), size=4, replace=False)]
        qs = [queries[q] for q, _ in rows]
        ts = [docs[d] for _, d in rows]
        if shard == 0:
            qs[1], ts[2] = "  ", None
        if shard == 1:
            rows[5] = (rows[5][0], None)
        if shard == 2:
            rows.append(rows[0])
            qs.append(qs[0])
            ts.append(ts[0])
        for (q, d), qt, t in zip(rows, qs, ts):
            if qt.strip() and t and d:
                expected[(q, d)] = (qt, t)
        put(fs, f"{bucket}/pairs/part-{shard}.parquet",
            pa.table({"query_id": [q for q, _ in rows], "query": qs, "doc_id": [d for _, d in rows],
                      "text": pa.array(ts, pa.string())}))
    out = f"s3://{bucket}/reranked/v1"
    table_cfg = {"name": "ranks", "catalog": {"name": "rr", "properties": {
        "type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"s3://{bucket}/warehouse"}}}
    cfg = job([f"s3://{bucket}/pairs/*.parquet"], out, opts, tiny_reranker_model, table=table_cfg)

    def iceberg(name="ranks"):
        from pipelines.output.table import open_catalog
        from pipelines.storage import Storage

        return open_catalog(cfg.output.table, Storage(out, opts)).load_table(("embedrank", name))

    def same_rows(a, b):
        return sorted(a.to_pylist(), key=lambda r: (r["query_id"], r["doc_id"])) == sorted(
            b.select(a.column_names).to_pylist(), key=lambda r: (r["query_id"], r["doc_id"]))

    first = run_rerank(cfg)
    totals = first["totals"]
    assert totals["rows"] == len(expected) and totals["queries"] == 6
    phases = first["startup"]  # the scoring replica reported its start with its first batch
    assert phases["replicas_reported"] == 1 and phases["replica_imports_s"] > 0 and phases["replica_load_s"] > 0
    assert 0 < phases["replica_ready_s"] <= phases["replica_first_batch_s"] <= phases["first_item_s"]
    assert totals["reject_reasons"]["empty_query"] == 1 and totals["reject_reasons"]["null_text"] == 1
    assert totals["reject_reasons"]["null_doc_id"] == 1
    assert totals["reject_reasons"]["duplicate_pair"] >= 1
    report = verify_output(out, opts)
    assert report.ok, report.problems
    on_ray = verify_output(out, opts, engine="ray")  # the Ray Data check: the same counts (scores, ranks, queries)
    assert (on_ray.problems, on_ray.counts) == (report.problems, report.counts) and report.counts["queries"] == 6

    ranked = read_committed(out, opts)
    by_query = check_ranks(ranked)
    assert set(by_query) == set(queries)
    assert sorted(zip(ranked.column("query_id").to_pylist(), ranked.column("doc_id").to_pylist())) == sorted(expected)
    assert ranked.schema.field("score").type == pa.float32()
    keys = list(zip(ranked.column("query_id").to_pylist(), ranked.column("doc_id").to_pylist()))
    want = reference_scores(tiny_reranker_model, [expected[k] for k in keys])
    assert np.abs(np.asarray(ranked.column("score").to_numpy()) - want).max() <= 1e-5
    rejects = read_committed(out, opts, rejects=True)
    assert sorted(rejects.column("reason").to_pylist()).count("duplicate_pair") == totals["reject_reasons"][
        "duplicate_pair"]
    # the Iceberg tables: exactly the final rank files (ranked from the committed scores) and the reject files
    ranks = iceberg()
    assert sorted(t.file.file_path for t in ranks.scan().plan_files()) == sorted(committed_files(out, opts))
    assert same_rows(ranked, ranks.scan().to_arrow()) and ranks.scan().to_arrow().num_rows == len(expected)
    assert iceberg("ranks_rejects").scan().to_arrow().num_rows == rejects.num_rows == sum(
        totals["reject_reasons"].values())

    again = run_rerank(cfg)
    assert again["items_processed"] == 0 and again["totals"]["rows"] == len(expected)

    commits = sorted(fs.ls(f"{bucket}/reranked/v1/{COMMITS_DIR}"))
    fs.rm(commits[:1])
    resumed = run_rerank(cfg)
    assert resumed["items_processed"] == 1
    assert fs.ls(f"{bucket}/reranked/v1/{RANK_COMMITS_DIR}")
    assert verify_output(out, opts).ok
    after = read_committed(out, opts)
    assert sorted(after.to_pylist(), key=lambda r: (r["query_id"], r["doc_id"])) == sorted(
        ranked.to_pylist(), key=lambda r: (r["query_id"], r["doc_id"]))
    ranks = iceberg()  # the resumed run's rank files replaced the old ones in the table
    assert sorted(t.file.file_path for t in ranks.scan().plan_files()) == sorted(committed_files(out, opts))
    assert same_rows(after, ranks.scan().to_arrow())


def test_doc_ids_joined_with_documents_and_top_k_through_a_faulty_s3(ray_local, s3_bucket, s3_server,
                                                                    tiny_reranker_model):
    """Both phases (score with the join, then rank) run against an S3 that fails every 20th request."""
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    rng = np.random.default_rng(1)
    docs = {f"d{i}": text(rng) for i in range(30)}
    put(fs, f"{bucket}/docs/a.parquet", pa.table({"doc_id": list(docs)[:20], "text": list(docs.values())[:20]}))
    put(fs, f"{bucket}/docs/b.parquet", pa.table({"doc_id": list(docs)[20:] + ["d3"],
                                                   "text": list(docs.values())[20:] + ["another d3"]}))
    queries = {f"q{i}": text(rng, 2, 8) for i in range(4)}
    pairs = [(q, d) for q in queries for d in rng.choice(list(docs), size=8, replace=False)]
    pairs += [("q0", "missing-doc"), ("q1", "d3")]
    put(fs, f"{bucket}/cands/c.parquet", pa.table({"query_id": [q for q, _ in pairs],
                                                    "query": [queries[q] for q, _ in pairs],
                                                    "doc_id": [d for _, d in pairs]}))
    out = f"s3://{bucket}/reranked/docs"
    host, port = s3_server.endpoint_url.removeprefix("http://").split(":")
    with FaultyProxy(host, int(port), every=20) as proxy:
        faulty = {**opts, "endpoint_url": proxy.endpoint_url}
        summary = run_rerank(job([f"s3://{bucket}/cands/*.parquet"], out, faulty, tiny_reranker_model,
                                 documents=[f"s3://{bucket}/docs/*.parquet"], top_k=3, rank_buckets="auto"))
        faults = proxy.stats
    print("proxy:", faults)
    assert all(faults[k] for k in FAULT_KINDS)
    reasons = summary["totals"]["reject_reasons"]
    assert reasons["unknown_doc"] == 1 and reasons["duplicate_document"] == sum(d == "d3" for _, d in pairs)
    report = verify_output(out, opts)
    assert report.ok, report.problems
    ranked = read_committed(out, opts)
    by_query = check_ranks(ranked, top_k=3)
    usable = {(q, d) for q, d in pairs if d in docs and d != "d3"}
    for q in queries:
        cands = [(qq, d) for qq, d in usable if qq == q]
        want = reference_scores(tiny_reranker_model, [(queries[q], docs[d]) for _, d in cands])
        best = sorted(zip(want, [d for _, d in cands]), key=lambda x: (-x[0], x[1]))[:3]
        got = sorted(by_query[q], key=lambda r: r["rank"])
        assert [r["doc_id"] for r in got] == [d for _, d in best]
        assert np.abs(np.array([r["score"] for r in got]) - np.array([s for s, _ in best])).max() <= 1e-5
    assert json.loads(fs.cat(f"{bucket}/reranked/docs/_SUCCESS"))["top_k"] == 3
    # rank_buckets: auto: a few dozen pairs make one bucket, recorded in its rank commit
    (rank_commit,) = fs.ls(f"{bucket}/reranked/docs/{RANK_COMMITS_DIR}")
    assert json.loads(fs.cat(rank_commit))["buckets"] == 1
