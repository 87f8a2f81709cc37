"""A poison corpus: every bad row and every bad file comes out in `_rejects/` exactly once, the rest committed."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.bad_files import corrupt_second_row_group

from actors.loading import load_tokenizer
from common.errors import InputError
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import read_committed
from pipelines.output.verify import verify_output

pytestmark = pytest.mark.integration

MAX_LENGTH = 64


def poison_corpus(root, model):
    """Files of a corpus that went wrong in every way we know; returns the ids readable rows carry."""
    long_text = " ".join(["tokens"] * 40_500)
    assert len(load_tokenizer(str(model))(long_text)["input_ids"]) >= 40_000
    texts = ["a fine text", None, "", " \n\t ", long_text, "another fine text", "still fine"]
    ids = ["ok-0", "null-text", "empty-text", "blank-text", "long-text", "ok-1", None]
    pq.write_table(pa.table({"doc_id": ids, "text": texts}), root / "a-rows.parquet")
    good = (root / "a-rows.parquet").read_bytes()
    (root / "b-truncated.parquet").write_bytes(good[: len(good) - 40])
    pq.write_table(pa.table({"doc_id": ["x"], "body": ["text under another name"]}), root / "c-drifted.parquet")
    pq.write_table(pa.table({"doc_id": ["y"], "text": [17]}), root / "d-wrong-type.parquet")
    corrupt_second_row_group(root / "e-corrupt.parquet")
    return [i for i in ids if i is not None] + [f"d{i}" for i in range(8)]


def config(corpus, out, model, **input_extra):
    return EmbedJobConfig.model_validate({
        "input": {"paths": [f"{corpus}/*.parquet"], "id_column": "doc_id", "rows_per_item": 4, **input_extra},
        "model": {"path": str(model), "max_length": MAX_LENGTH},
        "output": {"path": str(out)},
        "compute": {"batch_rows": 16},
    })


def test_poison_corpus_rejects_each_bad_row_and_file_once_and_commits_the_rest(
        ray_local, tmp_path, tiny_embedding_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    readable_ids = poison_corpus(corpus, tiny_embedding_model)
    out = tmp_path / "out"

    summary = run_embed(config(corpus, out, tiny_embedding_model))

    report = verify_output(str(out))
    assert report.ok, report.problems
    assert report.counts["rejected_files"] == 3 and report.counts["orphans"] == 0
    committed = read_committed(str(out))
    rejects = read_committed(str(out), rejects=True)
    got = committed.column("id").to_pylist()
    row_rejects = rejects.filter(pa.compute.is_valid(rejects.column("row")))
    rejected = dict(zip(zip(row_rejects.column("id").to_pylist(), row_rejects.column("row").to_pylist()),
                        row_rejects.column("reason").to_pylist()))
    assert len(got) == len(set(got)) and len(rejected) == row_rejects.num_rows
    assert sorted(got) == sorted(["ok-0", "long-text", "ok-1", "d0", "d1", "d2", "d3"])
    assert rejected == {("null-text", 1): "null_text", ("empty-text", 2): "empty_text",
                        ("blank-text", 3): "empty_text", (None, 6): "null_id",
                        **{(f"d{i}", i): "unreadable_row_group" for i in range(4, 8)}}
    assert set(got) | {i for i, _ in rejected if i} == set(readable_ids) and not set(got) & {i for i, _ in rejected}

    long_row = committed.filter(pa.compute.equal(committed.column("id"), "long-text")).to_pylist()[0]
    assert long_row["truncated"] is True and long_row["n_tokens"] == MAX_LENGTH

    whole = rejects.filter(pa.compute.is_null(rejects.column("row")))
    assert sorted(whole.column("reason").to_pylist()) == ["schema_mismatch", "schema_mismatch", "unreadable_file"]
    assert whole.column("id").null_count == 3
    assert summary["totals"]["rejected_files"] == [
        {"file": "b-truncated.parquet", "reason": "unreadable_file"},
        {"file": "c-drifted.parquet", "reason": "schema_mismatch"},
        {"file": "d-wrong-type.parquet", "reason": "schema_mismatch"}]
    assert summary["totals"]["reject_reasons"] == {"empty_text": 2, "null_id": 1, "null_text": 1,
                                                   "unreadable_row_group": 4}

    again = run_embed(config(corpus, out, tiny_embedding_model))
    assert again["items_processed"] == 0 and again["totals"] == {**summary["totals"],
                                                                 "wall_s": again["totals"]["wall_s"]}
    with pytest.raises(InputError, match=r"b-truncated\.parquet: not a readable Parquet file"):
        run_embed(config(corpus, tmp_path / "strict", tiny_embedding_model, on_bad_file="fail"))
