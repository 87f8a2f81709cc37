"""Vector columns from one pooled vector (`actors.quantize`): exact parity with sentence-transformers'
`quantize_embeddings` (the reference, written apart from our code) for the same ranges, Matryoshka truncation
as the model card's recipe, and the replica's columns from one forward pass."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from sentence_transformers.util.quantization import quantize_embeddings

from actors.embedder import EmbedReplica, Embedder
from actors.quantize import VectorSpec, calibration_ranges, quantize, truncate, vector_columns
from actors.settings import EmbedSettings
from actors.tokenize import TextTokenizer, arrow_to_ids, ids_to_arrow


def unit_vectors(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("dim", [64, 256, 1024])
@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_quantize_matches_sentence_transformers_for_the_same_ranges(precision, dim):
    calibration, docs = unit_vectors(200, dim, 1), unit_vectors(300, dim, 2)
    ranges = np.vstack([calibration.min(axis=0), calibration.max(axis=0)])
    expected = quantize_embeddings(docs, precision, ranges=ranges)
    ours = quantize(docs, precision, ranges if precision.endswith("int8") else None)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    if precision.endswith("int8"):  # documents outside the calibrated range are clipped as theirs are
        assert (ours == ours.min()).any() and len(np.unique(ours)) > 200


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_calibration_ranges_are_what_sentence_transformers_computes_from_the_same_sample(precision):
    sample, docs = unit_vectors(500, 128, 3), unit_vectors(100, 128, 4)
    expected = quantize_embeddings(docs, precision, calibration_embeddings=sample)
    np.testing.assert_array_equal(quantize(docs, precision, calibration_ranges(sample, 128)), expected)


def test_truncation_is_the_card_recipe_first_dims_then_l2():
    full = unit_vectors(10, 64, 5)
    reference = torch.nn.functional.normalize(torch.from_numpy(full[:, :16]), p=2, dim=1).numpy()
    np.testing.assert_allclose(truncate(full, 16), reference, rtol=0, atol=1e-7)
    assert truncate(full, 16).shape == (10, 16)


def test_arrow_types_are_fixed_size_lists_readers_take():
    cols = vector_columns(unit_vectors(3, 64), [VectorSpec("h", 64, "float16"), VectorSpec("q", 32, "int8",
                          ((-1.0,) * 32, (1.0,) * 32)), VectorSpec("b", 64, "binary"), VectorSpec("u", 64, "ubinary")])
    assert {k: v.type for k, v in cols.items()} == {"h": pa.list_(pa.float16(), 64), "q": pa.list_(pa.int8(), 32),
                                                    "b": pa.list_(pa.int8(), 8), "u": pa.list_(pa.uint8(), 8)}


def test_the_replica_writes_every_column_from_one_forward_pass(tiny_embedding_model):
    """Each column equals the card recipe at its width (an `Embedder` truncating itself), then their quantiser."""
    texts = ["alpha beta", "gamma", "a longer text about delta and epsilon", "zeta"]
    encoded, _ = TextTokenizer(str(tiny_embedding_model), None, 32, None).encode(texts)
    ids = pa.table({"input_ids": ids_to_arrow(encoded)})
    values, offsets = arrow_to_ids(ids.column("input_ids"))
    f32 = Embedder(str(tiny_embedding_model)).embed_ids(values, offsets)
    narrow = Embedder(str(tiny_embedding_model), dimensions=16).embed_ids(values, offsets)
    ranges = calibration_ranges(f32, 16) + np.array([[-0.05], [0.05]], dtype=np.float32)  # none on a bound
    specs = [VectorSpec("f", None, "float32"), VectorSpec("q", 16, "int8", tuple(map(tuple, ranges.tolist()))),
             VectorSpec("u", None, "ubinary")]
    replica = EmbedReplica(EmbedSettings(path=str(tiny_embedding_model), vectors=specs))
    out = replica(ids)
    assert "embedding" not in out.column_names

    def col(name):
        c = out.column(name).combine_chunks()
        return c.values.to_numpy(zero_copy_only=False).reshape(len(c), -1)

    np.testing.assert_allclose(col("f"), f32, rtol=0, atol=1e-5)
    q = col("q")
    expected = quantize_embeddings(narrow, "int8", ranges=ranges)
    assert np.abs(q.astype(int) - expected.astype(int)).max() <= 1 and (q == expected).mean() > 0.95
    np.testing.assert_array_equal(col("u"), quantize_embeddings(f32, "ubinary"))
