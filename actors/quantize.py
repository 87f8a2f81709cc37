"""Several stored vectors from one pooled vector: Matryoshka widths and float16 / int8 / uint8 / binary / ubinary
element types, with their Arrow types. Plain numpy and pyarrow (no torch): the replica calls it on the vectors
of its forward pass, the pipeline on calibration vectors, and tests on their own.

The element types follow `sentence_transformers.quantization.quantize_embeddings` (the tests pin exact parity):
int8/uint8 cut each dimension's calibrated `[min, max]` into 255 equal steps, `floor`, clipped to 0..255 (int8
then shifted by -128); binary/ubinary pack `value > 0` bits, most significant first (`numpy.packbits`), binary
shifted by -128 into int8. All arithmetic is float32, as theirs is.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa

DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")
"""Element types that need per-dimension ranges."""
_ELEMENT = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16()),
            "int8": (np.int8, pa.int8()), "uint8": (np.uint8, pa.uint8()),
            "binary": (np.int8, pa.int8()), "ubinary": (np.uint8, pa.uint8())}


@dataclasses.dataclass(frozen=True)
class VectorSpec:
    """One stored vector column: the first `dimensions` of the pooled vector, re-normalised, as `dtype`.

    `ranges` (int8/uint8 only): `[[min per dimension], [max per dimension]]`, `dimensions` each."""

    column: str
    dimensions: int | None
    """None: the pooled width (the replica fills it in)."""
    dtype: str
    ranges: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def width(self) -> int:
        """Values per row as stored: `dimensions`, or packed bytes for binary/ubinary."""
        return (self.dimensions + 7) // 8 if self.dtype in ("binary", "ubinary") else self.dimensions

    @property
    def arrow_type(self) -> pa.DataType:
        """`fixed_size_list<element>[width]`: DuckDB reads it as an ARRAY, LanceDB as a vector (uint8 with
        `distance_type="hamming"` for ubinary)."""
        return pa.list_(_ELEMENT[self.dtype][1], self.width)


def truncate(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` of each row, L2 re-normalised (the model card's MRL recipe); float32."""
    head = np.ascontiguousarray(vectors[:, :dimensions], dtype=np.float32)
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return head / np.maximum(norms, np.float32(1e-12))


def calibration_ranges(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Per-dimension `[min; max]` (2 × dimensions, float32) of the truncated, re-normalised vectors."""
    head = truncate(vectors, dimensions)
    return np.vstack([head.min(axis=0), head.max(axis=0)]).astype(np.float32)


def ranges_digest(ranges) -> str:
    """A short digest of the float32 bytes of the ranges: what a fingerprint records of them."""
    return hashlib.sha256(np.asarray(ranges, dtype=np.float32).tobytes()).hexdigest()[:16]


def quantize(vectors: np.ndarray, dtype: str, ranges=None) -> np.ndarray:
    """Float vectors (rows × d) as `dtype` (see the module docstring)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if dtype in ("float32", "float16"):
        return vectors.astype(_ELEMENT[dtype][0])
    if dtype in CALIBRATED:
        if ranges is None:
            raise ValueError(f"{dtype} needs calibration ranges")
        lo, hi = np.asarray(ranges, dtype=np.float32)
        step = (hi - lo) / np.float32(255)
        step[step == 0] = 1
        levels = np.clip(np.floor((vectors - lo) / step), 0, 255)
        return levels.astype(np.uint8) if dtype == "uint8" else (levels - 128).astype(np.int8)
    if dtype in ("binary", "ubinary"):
        bits = np.packbits(vectors > 0, axis=-1)
        return bits if dtype == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(f"unknown vector dtype {dtype!r}; one of {', '.join(DTYPES)}")


def to_arrow(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    """A rows × width matrix as a `fixed_size_list` array of `arrow_type`."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type.value_type)
    return pa.FixedSizeListArray.from_arrays(flat, arrow_type.list_size)


def vector_columns(pooled: np.ndarray, specs: list[VectorSpec]) -> dict[str, pa.FixedSizeListArray]:
    """Every configured column from one matrix of pooled, normalised vectors."""
    out = {}
    for spec in specs:
        head = pooled if spec.dimensions == pooled.shape[1] else truncate(pooled, spec.dimensions)
        out[spec.column] = to_arrow(quantize(head, spec.dtype, spec.ranges), spec.arrow_type)
    return out
