"""Typed records: one JSON form each (versioned), Arrow rows for what travels from tasks, old records still read."""

import json

import pytest

from common.errors import OutputError
from pipelines.output.records import FORMAT_VERSION, FileRef, ItemCommit, Piece, RankCommit, Totals

# `_commits/<item>.json` exactly as embedrank wrote it before records were typed (no `format` field)
LEGACY_COMMIT = {
    "item": "a1b2", "fingerprint_id": "fp01", "source": "part-0.parquet", "row_start": 0, "row_end": 5,
    "files": [{"path": "data/a1b2-0-3-0123456789ab.parquet", "rows": 3, "sha256": "ab" * 32, "bytes": 1200,
               "first_row": 0, "end_row": 4}],
    "rejects": [{"path": "_rejects/a1b2-0-3-fedcba987654.parquet", "rows": 1, "sha256": "cd" * 32}],
    "rows": 3, "rejected": 1, "reject_reasons": {"null_text": 1}, "tokens": 42, "padded_tokens": 48,
    "carried": 0, "length_hist": [0, 0, 1, 2], "committed_at": "2026-11-27T10:00:00+00:00",
}
LEGACY_BAD_FILE = {**LEGACY_COMMIT, "files": [], "rows": 0, "rejected": 0, "reject_reasons": {},
                   "bad_file": {"reason": "unreadable_file", "detail": "x: not Parquet"}}
LEGACY_RANK = {"bucket": 3, "fingerprint_id": "fp01",
               "files": [{"path": "data/rank-00003-aa.parquet", "rows": 7, "sha256": "ef" * 32, "bytes": 900}],
               "rejects": [], "rows": 7, "rejected": 0, "queries": 2, "scored": 7}


def test_records_written_before_the_change_still_read_and_write_back_the_same_fields():
    commit = ItemCommit.from_json(LEGACY_COMMIT)
    assert commit.files[0].path == "data/a1b2-0-3-0123456789ab.parquet" and commit.files[0].end_row == 4
    assert commit.rejects[0].bytes is None and commit.reject_reasons == {"null_text": 1}
    assert commit.to_json() == {**LEGACY_COMMIT, "format": FORMAT_VERSION}
    bad = ItemCommit.from_json(LEGACY_BAD_FILE)
    assert bad.bad_file.reason == "unreadable_file" and bad.to_json()["bad_file"]["detail"] == "x: not Parquet"
    rank = RankCommit.from_json(LEGACY_RANK)
    assert rank.name == "bucket-00003" and rank.named_paths == ["data/rank-00003-aa.parquet"]
    assert rank.to_json() == {**LEGACY_RANK, "format": FORMAT_VERSION}


def test_a_record_from_a_newer_embedrank_is_refused_not_misread():
    with pytest.raises(OutputError, match="newer than this embedrank reads"):
        ItemCommit.from_json({**LEGACY_COMMIT, "format": FORMAT_VERSION + 1})


def test_pieces_cross_the_task_boundary_as_arrow_rows_unchanged():
    pieces = [Piece(item="i1", start=0, end=4, item_rows=10,
                    data_files=(FileRef("data/x=1/i1-0-3-aa.parquet", 3, "aa" * 32, 100),
                                FileRef("data/x=2/i1-0-3-bb.parquet", 1, "bb" * 32, 90)),
                    reject_file=None, tokens=17, padded_tokens=20, length_hist=(0, 1, 3), carried_rows=2),
              Piece(item="i1", start=4, end=10, item_rows=10,
                    reject_file=FileRef("_rejects/i1-4-9-cc.parquet", 6, "cc" * 32, 80),
                    reject_reasons={"empty_text": 2, "null_id": 4})]
    table = Piece.table(pieces)
    assert table.schema == Piece.ARROW_SCHEMA and table.num_rows == 2
    back = [Piece.from_row(r) for r in table.to_pylist()]
    assert back == pieces
    assert (back[0].data_rows, back[0].reject_rows, back[1].data_rows, back[1].reject_rows) == (4, 0, 0, 6)


def test_an_item_commit_names_exactly_the_tiling_pieces_files_and_sums_them():
    a = Piece(item="i", start=0, end=3, item_rows=5, data_files=(FileRef("data/a.parquet", 2, "a", 10),),
              reject_file=FileRef("_rejects/a.parquet", 1, "r", 5), reject_reasons={"null_text": 1}, tokens=9,
              padded_tokens=12, length_hist=(1, 1), carried_rows=0)
    b = Piece(item="i", start=3, end=5, item_rows=5, data_files=(FileRef("data/b.parquet", 2, "b", 11),),
              tokens=4, padded_tokens=4, length_hist=(0, 0, 2), carried_rows=1)
    c = ItemCommit.of_pieces(item="i", fingerprint_id="fp", source="f.parquet", row_start=0, row_end=5,
                             pieces=[a, b])
    assert [(f.path, f.first_row, f.end_row) for f in c.files] == [("data/a.parquet", 0, 3), ("data/b.parquet", 3, 5)]
    assert (c.rows, c.rejected, c.tokens, c.padded_tokens, c.carried) == (4, 1, 13, 16, 1)
    assert c.length_hist == (1, 1, 2) and c.reject_reasons == {"null_text": 1}
    assert ItemCommit.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_totals_sum_commits_and_a_rerank_adds_its_rank_phase():
    c1 = ItemCommit.from_json(LEGACY_COMMIT)
    c2 = ItemCommit.from_json({**LEGACY_COMMIT, "item": "z", "rows": 10, "reject_reasons": {"empty_text": 2},
                               "rejected": 2, "carried": 4})
    bad = ItemCommit.from_json(LEGACY_BAD_FILE)
    totals = Totals.of([c1, c2, bad])
    assert totals.to_json() == {"items": 3, "rows": 13, "rejected": 3, "reject_reasons": {"empty_text": 2,
                                "null_text": 1}, "tokens": 126, "carried": 4,
                                "rejected_files": [{"file": "part-0.parquet", "reason": "unreadable_file"}]}
    ranks = [RankCommit.from_json(LEGACY_RANK), RankCommit.from_json({**LEGACY_RANK, "bucket": 4, "rejected": 2})]
    ranked = Totals.of([c1, c2]).ranked(ranks, top_k=5).to_json()
    assert (ranked["scored"], ranked["rows"], ranked["queries"], ranked["top_k"]) == (13, 14, 4, 5)
    assert ranked["rejected"] == 3 + 2 and ranked["reject_reasons"]["duplicate_pair"] == 2
