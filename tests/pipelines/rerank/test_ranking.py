"""Ranking: one row per pair, ranks a permutation per query, top_k, duplicates rejected, stable buckets."""

import json
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import MIB, ConfigError, load_config
from pipelines.input.plan import make_plan
from pipelines.input.reading import read_item
from pipelines.lifecycle import ItemsOutcome
from pipelines.output.records import ItemCommit, RankCommit
from pipelines.output.root import OutputRoot
from pipelines.rerank import job as rerank_job
from pipelines.rerank.config import RerankInputConfig, RerankJobConfig
from pipelines.rerank.ranking import (
    MAX_PAIRS_PER_BUCKET,
    bucket_of,
    rank_bucket_count,
    rank_table,
)
from pipelines.storage import Storage

ORDER = {"i": 0, "i1": 1, "i2": 2, "i3": 3}
"""File order of the made-up items below: i1's rows come before i2's."""


def scores(rows):
    q, d, s, item, r = zip(*rows)
    return pa.table({"query_id": list(q), "doc_id": list(d), "score": pa.array(s, pa.float32()),
                     "_item": list(item), "_row": list(r)})


def test_ranks_are_a_permutation_per_query_best_first_ties_by_doc_id():
    t = scores([("q1", "a", 0.2, "i1", 0), ("q2", "x", 0.9, "i1", 1), ("q1", "b", 0.8, "i2", 0),
                ("q1", "c", 0.5, "i1", 2), ("q2", "y", 0.9, "i2", 1), ("q1", "d", 0.8, "i3", 0)])
    ranked, dups = rank_table(t, None, ORDER)
    assert dups.num_rows == 0
    got = {(r["query_id"], r["doc_id"]): r["rank"] for r in ranked.to_pylist()}
    assert got == {("q1", "b"): 1, ("q1", "d"): 2, ("q1", "c"): 3, ("q1", "a"): 4, ("q2", "x"): 1, ("q2", "y"): 2}


def test_top_k_keeps_the_best_k_per_query():
    rng = np.random.default_rng(0)
    rows = [(f"q{q}", f"d{d}", float(rng.random()), "i", q * 100 + d) for q in range(5) for d in range(20)]
    ranked, _ = rank_table(scores(rows), 3, ORDER)
    assert ranked.num_rows == 15
    for q in range(5):
        best = sorted((r for r in rows if r[0] == f"q{q}"), key=lambda r: -r[2])[:3]
        mine = [r for r in ranked.to_pylist() if r["query_id"] == f"q{q}"]
        assert [r["doc_id"] for r in sorted(mine, key=lambda r: r["rank"])] == [b[1] for b in best]


def test_duplicate_pairs_keep_the_first_occurrence_and_reject_the_rest():
    t = scores([("q", "a", 0.1, "i2", 5), ("q", "a", 0.9, "i1", 7), ("q", "b", 0.5, "i1", 1),
                ("q", "a", 0.3, "i1", 9)])
    ranked, dups = rank_table(t, None, ORDER)
    assert sorted((r["doc_id"], r["score"] > 0.8) for r in ranked.to_pylist()) == [("a", True), ("b", False)]
    assert sorted(zip(dups.column("_item").to_pylist(), dups.column("_row").to_pylist())) == [("i1", 9), ("i2", 5)]


def write_pairs(path):
    pq.write_table(pa.table({"query_id": ["q", "q"], "query": ["what", "what"], "doc_id": ["a", "b"],
                             "text": ["doc a", "doc b"]}), path)


def plan_whose_later_file_sorts_first(tmp_path):
    """Two pair files whose real work-item ids sort opposite to their file order (the later file's name is
    searched for: item ids hash the path, size and mtime; each try renames both, an even chance)."""
    cfg = RerankInputConfig(paths=[str(tmp_path / "*.parquet")])
    for n in range(64):
        first, later = tmp_path / f"a{n}.parquet", tmp_path / f"b{n}.parquet"
        write_pairs(first)
        write_pairs(later)
        plan = make_plan(cfg)
        if plan.items[1].item_id < plan.items[0].item_id:
            return plan
        first.unlink()
        later.unlink()
    raise AssertionError("no file names gave item ids in the opposite order")


def test_duplicate_pairs_keep_the_earlier_file_whatever_its_item_id(tmp_path):
    plan = plan_whose_later_file_sorts_first(tmp_path)
    earlier, later = plan.items
    assert [earlier.rel, later.rel] == sorted([earlier.rel, later.rel]) and later.item_id < earlier.item_id
    t = scores([("q", "a", 0.9, later.item_id, 0), ("q", "a", 0.25, earlier.item_id, 0),
                ("q", "a", 0.5, earlier.item_id, 1)])
    ranked, dups = rank_table(t, None, plan.item_order())
    assert ranked.column("score").to_pylist() == [0.25], "the pair of the earlier file (row 0) is kept"
    assert sorted(zip(dups.column("_item").to_pylist(), dups.column("_row").to_pylist())) == sorted(
        [(earlier.item_id, 1), (later.item_id, 0)])


def test_buckets_are_stable_and_spread():
    ids = [f"query-{i}" for i in range(1000)]
    b = bucket_of(ids, 16)
    assert b.tolist() == bucket_of(ids, 16).tolist()
    assert set(b.tolist()) == set(range(16))


def test_duplicate_pairs_in_a_cut_jsonl_file_keep_the_earlier_line(tmp_path):
    lines = [json.dumps({"query_id": "q", "query": "what", "doc_id": f"d{i % 7}", "text": f"doc {i}"})
             for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = RerankInputConfig(paths=[str(tmp_path / "pairs.jsonl")], format="jsonl", jsonl_item_mb=300 / MIB)
    plan = make_plan(cfg)
    assert len(plan.items) > 3
    rows = pa.concat_tables([read_item(i, cfg) for i in reversed(plan.items)])  # arrival order means nothing
    t = pa.table({"query_id": rows.column("query_id"), "doc_id": rows.column("doc_id"),
                  "score": pa.array(np.arange(rows.num_rows, dtype=np.float32)),
                  "_item": rows.column("_item"), "_row": rows.column("_row")})
    kept_text = dict(zip(zip(rows.column("_item").to_pylist(), rows.column("_row").to_pylist()),
                         rows.column("text").to_pylist()))
    ranked, dups = rank_table(t, None, plan.item_order())
    assert ranked.num_rows == 7 and dups.num_rows == 13
    kept = {(r["_item"], r["_row"]) for r in t.to_pylist()} - set(zip(dups.column("_item").to_pylist(),
                                                                      dups.column("_row").to_pylist()))
    assert sorted(kept_text[k] for k in kept) == sorted(f"doc {i}" for i in range(7))


@pytest.mark.parametrize("pairs, buckets", [
    (0, 1), (1, 1), (MAX_PAIRS_PER_BUCKET - 1, 1), (MAX_PAIRS_PER_BUCKET, 1), (MAX_PAIRS_PER_BUCKET + 1, 2),
    (3 * MAX_PAIRS_PER_BUCKET, 3), (10 ** 9, 500),
])
def test_auto_rank_buckets_hold_at_most_the_limit(pairs, buckets):
    chosen, why = rank_bucket_count("auto", pairs)
    assert chosen == buckets and "auto" in why and f"{MAX_PAIRS_PER_BUCKET:,}" in why


def test_an_explicit_bucket_count_wins_and_a_resumed_auto_keeps_its_recorded_count():
    assert rank_bucket_count(7, 10 ** 9) == (7, "output.rank_buckets: 7")
    assert rank_bucket_count(7, 10 ** 9, recorded=3)[0] == 7  # the fingerprint holds an explicit count
    chosen, why = rank_bucket_count("auto", 10, recorded=3)
    assert chosen == 3 and "(now 1)" in why
    assert rank_bucket_count("auto", 10, recorded=1) == (
        1, "output.rank_buckets: auto, as the 1 of the rank commits already made")


def test_rank_buckets_default_to_auto_and_are_validated(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {paths: [x.parquet]}\nmodel: {path: m}\noutput: {path: /out}\n")
    assert load_config(path, schema=RerankJobConfig).output.rank_buckets == "auto"
    assert load_config(path, ["output.rank_buckets=12"], schema=RerankJobConfig).output.rank_buckets == 12
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="output.rank_buckets"):
            load_config(path, [f"output.rank_buckets={bad}"], schema=RerankJobConfig)


def test_a_rank_commit_records_its_bucket_count_and_older_records_still_read():
    record = RankCommit(bucket=2, fingerprint_id="fp", queries=1, scored=3, buckets=5)
    assert RankCommit.from_json(json.loads(json.dumps(record.to_json()))) == record
    older = {k: v for k, v in record.to_json().items() if k != "buckets"}
    assert RankCommit.from_json(older).buckets is None


def fake_rank_phase(monkeypatch, seen):
    """`build_rank_graph` and `stream_rows` replaced: no Ray; each bucket not skipped yields one rank record."""
    graph = types.ModuleType("pipelines.rerank.graph")

    def build_rank_graph(files, storage, fingerprint, buckets, skip, top_k, io_num_cpus, item_order):
        seen.append((buckets, skip))
        return [RankCommit.row(b, None, None, queries=1, scored=10 // buckets + (b < 10 % buckets))
                for b in range(buckets) if b not in skip]

    graph.build_rank_graph = build_rank_graph
    monkeypatch.setitem(sys.modules, "pipelines.rerank.graph", graph)
    monkeypatch.setattr(rerank_job, "stream_rows", lambda make, run: iter(make()))


@pytest.mark.parametrize("already", [None, 3])
def test_the_rank_phase_prints_and_records_its_bucket_count_and_a_resume_keeps_it(tmp_path, monkeypatch, capsys,
                                                                                already):
    """10 scored pairs: auto picks 1 bucket; rank commits that recorded 3 (a run under another limit) keep 3."""
    cfg = RerankJobConfig.model_validate({"input": {"paths": ["x.parquet"]}, "model": {"path": "m"},
                                          "output": {"path": str(tmp_path / "out")}})
    root = OutputRoot(Storage(cfg.output.path))
    if already:
        root.write_rank_commit(RankCommit(bucket=0, fingerprint_id="fp", queries=1, scored=4, buckets=already))
    seen = []
    fake_rank_phase(monkeypatch, seen)
    outcome = ItemsOutcome("fp", None, {"i": ItemCommit(item="i", fingerprint_id="fp", source="x.parquet",
                                                        row_start=0, row_end=10, rows=10)})
    done = rerank_job.rank_scores(cfg, root, {}, "fp", outcome, {"i": 0}, sys.stdout)
    want = already or 1
    assert seen == [(want, [0] if already else [])]
    assert sorted(c.bucket for c in done) == list(range(want)) and {c.buckets for c in done} == {want}
    assert sum(c.scored for c in done) == 10
    assert f"rank: {want} bucket(s) for 10 scored pairs (output.rank_buckets: auto" in capsys.readouterr().out
