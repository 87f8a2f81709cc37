"""Several vector columns from one forward pass, end to end on local disk and the session's Ray: the columns as
configured, int8 calibrated on the plan's first documents and recorded, the recorded ranges reused on a resume
and a changed range refused, DuckDB reading the int8 column, LanceDB searching the ubinary column by hamming,
and a reindex carrying every column of its unchanged documents. Quantised values are checked against
sentence-transformers' `quantize_embeddings` (the reference) applied to the job's own float column."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from common.errors import OutputError
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import open_dataset, read_committed
from pipelines.output.report import REPORT_FILE
from pipelines.output.verify import verify_output
from pipelines.reindex.config import ReindexJobConfig
from pipelines.reindex.job import run_reindex

pytestmark = pytest.mark.integration

WORDS = "ray data streams blocks to actors that embed sorted batches under a token budget".split()
VECTORS = [{"column": "f32", "dtype": "float32"}, {"column": "h", "dtype": "float16"},
           {"column": "q", "dimensions": 32, "dtype": "int8"}, {"column": "bits", "dtype": "ubinary"},
           {"column": "sbits", "dimensions": 32, "dtype": "binary"}]
CALIBRATION_ROWS = 50


def corpus(folder, seed: int = 0, edit: set[int] = frozenset()) -> str:
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for f in range(2):
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) + (" edited" if f * 40 + i in edit else "")
                 for i in range(40)]
        pq.write_table(pa.table({"doc_id": [f"d{f * 40 + i}" for i in range(40)], "text": texts}),
                       folder / f"part{f}.parquet", row_group_size=20)
    return str(folder / "*.parquet")


def spec(paths: str, model) -> dict:
    return {"input": {"paths": [paths], "id_column": "doc_id", "rows_per_item": 20},
            "model": {"path": str(model), "max_length": 32, "max_batch_tokens": 1024},
            "compute": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1, "batch_rows": 32},
            "run": {"progress_interval_s": 60}}


def matrix(table: pa.Table, column: str) -> np.ndarray:
    c = table.column(column).combine_chunks()
    return c.values.to_numpy(zero_copy_only=False).reshape(len(c), -1)


def embed(paths, out, model, vectors=VECTORS):
    log = io.StringIO()
    cfg = EmbedJobConfig.model_validate({**spec(paths, model), "output": {
        "path": out, "vectors": vectors, "calibration_rows": CALIBRATION_ROWS}})
    return run_embed(cfg, stream=log), log.getvalue()


def test_three_dtypes_one_pass_calibrated_recorded_refused_read_and_carried(ray_local, tiny_embedding_model, tmp_path):
    paths = corpus(tmp_path / "snap1")
    out = str(tmp_path / "out")
    summary, log = embed(paths, out, tiny_embedding_model)
    assert summary["totals"]["rows"] == 80, log
    assert f"ranges from the plan's first {CALIBRATION_ROWS}" in log
    table = read_committed(out).sort_by("id")
    assert table.column_names[:6] == ["id", "f32", "h", "q", "bits", "sbits"]
    assert {c: table.schema.field(c).type for c in ("f32", "h", "q", "bits", "sbits")} == {
        "f32": pa.list_(pa.float32(), 64), "h": pa.list_(pa.float16(), 64), "q": pa.list_(pa.int8(), 32),
        "bits": pa.list_(pa.uint8(), 8), "sbits": pa.list_(pa.int8(), 4)}
    assert verify_output(out).ok
    report = (tmp_path / "out" / REPORT_FILE).read_text()
    assert "f32 float32[full], h float16[full], q int8[32] (ranges " in report and "bits ubinary[full]" in report

    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    q_cfg = next(v for v in job["config"]["output"]["vectors"] if v["column"] == "q")
    ranges = np.asarray(q_cfg["ranges"], dtype=np.float32)
    assert ranges.shape == (2, 32) and job["fingerprint"]["calibration_rows"] == CALIBRATION_ROWS
    # the reference: the job's own float column, truncated and re-normalised here, quantised by sentence-transformers
    f32 = matrix(table, "f32")
    head = f32[:, :32] / np.linalg.norm(f32[:, :32], axis=1, keepdims=True)
    order = np.argsort([int(i[1:]) for i in table.column("id").to_pylist()], kind="stable")  # plan order: d0, d1…
    sample = head[order[:CALIBRATION_ROWS]]
    np.testing.assert_allclose(ranges, np.vstack([sample.min(0), sample.max(0)]), rtol=0, atol=1e-6)
    q, expected = matrix(table, "q"), quantize_embeddings(head, "int8", ranges=ranges)
    assert np.abs(q.astype(int) - expected.astype(int)).max() <= 1 and (q == expected).mean() > 0.99
    np.testing.assert_array_equal(matrix(table, "bits"), quantize_embeddings(f32, "ubinary"))
    np.testing.assert_array_equal(matrix(table, "sbits"), quantize_embeddings(head, "binary"))
    np.testing.assert_allclose(matrix(table, "h").astype(np.float32), f32, rtol=0, atol=1e-3)

    summary, log = embed(paths, out, tiny_embedding_model)  # a resume reuses the recorded ranges
    assert "recorded in _job.json" in log and summary["items_skipped"] == 4, log
    other = [{**v, "ranges": [[-1.0] * 32, [1.0] * 32]} if v["column"] == "q" else v for v in VECTORS]
    with pytest.raises(OutputError, match="vectors"):
        embed(paths, out, tiny_embedding_model, other)

    import duckdb  # DuckDB reads the int8 column as an INT8 array
    files = [str(p) for p in (tmp_path / "out" / "data").rglob("*.parquet")]
    con = duckdb.connect()
    got = con.execute("SELECT id, q FROM read_parquet(?) ORDER BY id LIMIT 1", [files]).fetchone()
    first = table.filter(pa.compute.equal(table.column("id"), got[0]))
    assert list(got[1]) == matrix(first, "q")[0].tolist()
    assert con.execute("SELECT typeof(q) FROM read_parquet(?) LIMIT 1", [files]).fetchone()[0] == "TINYINT[]"
    dot = con.execute("SELECT list_dot_product(q::INTEGER[], q::INTEGER[]) FROM read_parquet(?) WHERE id = ?",
                      [files, got[0]]).fetchone()[0]
    assert dot == int((matrix(first, "q")[0].astype(int) ** 2).sum())

    import lancedb  # LanceDB searches the packed bits by hamming distance
    db = lancedb.connect(str(tmp_path / "lance"))
    tbl = db.create_table("docs", open_dataset(out).scanner(columns=["id", "bits"]).to_reader())
    query = matrix(table, "bits")[5]
    hits = tbl.search(query, vector_column_name="bits").distance_type("hamming").limit(3).to_arrow()
    bits = np.unpackbits(matrix(table, "bits"), axis=1)
    hamming = (bits != np.unpackbits(query)).sum(axis=1)
    assert hits.column("id")[0].as_py() == table.column("id")[5].as_py()
    assert sorted(hits.column("_distance").to_pylist()) == sorted(hamming)[:3]

    index = str(tmp_path / "index")  # reindex: v1, then v2 with two edits, every column of 78 documents carried
    rspec = {**spec(paths, tiny_embedding_model), "index": {"path": index, "vectors": VECTORS,
                                                             "calibration_rows": CALIBRATION_ROWS}}
    v1 = run_reindex(ReindexJobConfig.model_validate(rspec), stream=io.StringIO())
    rspec["input"] = {**rspec["input"], "paths": [corpus(tmp_path / "snap2", edit={3, 60})]}
    log = io.StringIO()
    v2 = run_reindex(ReindexJobConfig.model_validate(rspec), stream=log)
    assert v1["published"] == "v000001" and v2["published"] == "v000002", log.getvalue()
    assert "ranges of v000001" in log.getvalue() and v2["carried_rows"] == 78 and v2["embedded_rows"] == 2
    old = pa.concat_tables(pq.read_table(p) for p in (tmp_path / "index" / "v000001" / "data").rglob("*.parquet"))
    new = read_committed(index)
    old, new = old.sort_by("id"), new.sort_by("id")
    same = [i for i, k in enumerate(new.column("id").to_pylist()) if k not in ("d3", "d60")]
    for column in ("f32", "h", "q", "bits", "sbits"):
        np.testing.assert_array_equal(matrix(new, column)[same], matrix(old, column)[same])
        assert new.schema.field(column).type == old.schema.field(column).type
