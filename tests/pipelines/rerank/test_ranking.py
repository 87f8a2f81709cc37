"""Ranking: one row per pair, ranks a permutation per query, top_k, duplicates rejected, stable buckets."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.input.plan import make_plan
from pipelines.rerank.config import RerankInputConfig
from pipelines.rerank.ranking import bucket_of, rank_table

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
    searched for: item ids hash the path, size and mtime)."""
    write_pairs(tmp_path / "a.parquet")
    cfg = RerankInputConfig(paths=[str(tmp_path / "*.parquet")])
    for n in range(64):
        write_pairs(tmp_path / f"b{n}.parquet")
        plan = make_plan(cfg)
        if plan.items[1].item_id < plan.items[0].item_id:
            return plan
        (tmp_path / f"b{n}.parquet").unlink()
    raise AssertionError("no file name gave item ids in the opposite order")


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
