"""`embedrank demo` with configs/demo-vectors.yaml: offline, on a randomly initialised stand-in built wide enough
for the config (256), one run writes the three columns of README's "Several vector columns" (float16 at the full
width, int8 of the first 256 dimensions, ubinary packed bits), verified; and the docs' DuckDB int8 and LanceDB
hamming searches run on that output as written (`support.doc_snippets` finds them in README.md or
docs/vectors.md), their answers checked against numpy."""

import os

import numpy as np
import pyarrow as pa
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from pipelines.demo import run_demo
from pipelines.output.reader import committed_files, open_dataset, read_committed
from pipelines.output.verify import verify_output
from support.doc_snippets import REPO, run, snippets

pytestmark = pytest.mark.integration

ROWS = 60
WIDTH = 256
"""The stand-in's width: the config's widest column (int8's 256 dimensions)."""


@pytest.fixture(scope="module")
def demo_output(ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("demo-vectors")
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: the demo builds its stand-in
    try:
        assert run_demo(str(work), rows=ROWS, config=str(REPO / "configs" / "demo-vectors.yaml")) == 0
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = before
    return str(work / f"output-{ROWS}")


def matrix(table: pa.Table, column: str) -> np.ndarray:
    c = table.column(column).combine_chunks()
    return c.values.to_numpy(zero_copy_only=False).reshape(len(c), -1)


def test_the_demo_writes_the_three_columns(demo_output):
    table = read_committed(demo_output).sort_by("id")
    assert table.num_rows == ROWS - 3 * 2  # each of the 3 shards has one null and one blank text, rejected
    assert {c: table.schema.field(c).type for c in ("embedding_f16", "embedding_i8", "embedding_bits")} == {
        "embedding_f16": pa.list_(pa.float16(), WIDTH), "embedding_i8": pa.list_(pa.int8(), 256),
        "embedding_bits": pa.list_(pa.uint8(), WIDTH // 8)}
    assert "embedding" not in table.column_names
    report = verify_output(demo_output)
    assert report.ok, report.problems
    half = matrix(table, "embedding_f16").astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1, atol=1e-2)
    # the bits are the float vector's signs (sentence-transformers' quantiser on the float16 column: a value that
    # float16 rounds to 0 may differ, so nearly every bit, not all)
    bits = np.unpackbits(matrix(table, "embedding_bits"), axis=1)
    expected = np.unpackbits(quantize_embeddings(half, "ubinary"), axis=1)
    assert (bits == expected).mean() > 0.999


def test_the_docs_int8_and_hamming_searches_run_as_written(demo_output, tmp_path):
    table = read_committed(demo_output).sort_by("id")
    ids = table.column("id").to_pylist()
    i8, packed = matrix(table, "embedding_i8").astype(np.int64), matrix(table, "embedding_bits")
    namespace = {"out": demo_output, "committed_files": committed_files, "dataset": open_dataset(demo_output),
                 "query_i8": matrix(table, "embedding_i8")[7], "query_bits": packed[7]}

    found = snippets("vectors-duckdb-int8", "Several vector columns", "list_dot_product")
    for _, code in found:
        rows = run(code, dict(namespace)).fetchall()
        scores = i8 @ i8[7]
        assert [s for _, s in rows] == sorted(scores, reverse=True)[:10]
        assert all(scores[ids.index(i)] == s for i, s in rows)

    found = snippets("vectors-lancedb-hamming", "Several vector columns", '"hamming"')
    for n, (_, code) in enumerate(found):
        assert code.count('"/data/lance"') == 1  # the one edit: the database goes under this test's folder
        space = dict(namespace)
        run(code.replace('"/data/lance"', repr(str(tmp_path / f"lance{n}"))), space)
        hamming = (np.unpackbits(packed, axis=1) != np.unpackbits(packed[7])).sum(axis=1)
        assert [h["_distance"] for h in space["hits"]] == sorted(hamming)[:10]
        assert all(hamming[ids.index(h["id"])] == h["_distance"] for h in space["hits"])
        assert space["hits"][0]["_distance"] == 0
