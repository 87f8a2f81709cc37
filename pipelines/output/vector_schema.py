"""What vector columns an embedding output's files must hold, and `embedrank verify`'s checks of them.

The fingerprint names them: `vectors` (`[{column, dimensions, dtype}]`), else the one `embedding` column of
`vector_dtype` at `dimensions`. Each must be in every data file as `fixed_size_list<element>[width]` (width:
`dimensions`, or `⌈dimensions/8⌉` packed bytes for binary/ubinary; `actors.quantize.VectorSpec`), no other
fixed-size list column may be there, and float vectors must be L2-unit (the recipe normalises after any cut).

A column whose `dimensions` is null has the model's pooled width, which no record holds: each file reports the
width it found, and the driver (`width_problems`, the same for both verify engines) names the files whose
width differs from the one most files have (on a tie, the first file's in commit order).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pyarrow as pa

from actors.quantize import VectorSpec
from common.columns import EMBEDDING

Expected = list[list[Any]]
"""`[[column, dtype, dimensions or None], …]` (JSON-able: it travels to the ray engine's tasks)."""

NORM_TOLERANCE = {"float32": 1e-3, "float16": 1e-2}
"""How far a stored float vector's L2 norm may be from 1 (float16 rounds each value by up to 2⁻¹¹ relative)."""


def expected_vectors(fingerprint: dict[str, Any]) -> Expected | None:
    """The vector columns of an embedding output's fingerprint (None: not an embedding output, nothing to check)."""
    if fingerprint.get("task") != "embed":
        return None
    if fingerprint.get("vectors"):
        return [[v["column"], v["dtype"], v.get("dimensions")] for v in fingerprint["vectors"]]
    return [[EMBEDDING, fingerprint.get("vector_dtype") or "float32", fingerprint.get("dimensions")]]


def _spec(column: str, dtype: str, dimensions: int | None) -> VectorSpec:
    return VectorSpec(column, dimensions, dtype)


def type_name(arrow_type: pa.DataType) -> str:
    """`fixed_size_list<int8>[256]` (pyarrow's own name carries the child field's name, which varies)."""
    if pa.types.is_fixed_size_list(arrow_type):
        return f"fixed_size_list<{arrow_type.value_type}>[{arrow_type.list_size}]"
    return str(arrow_type)


def _describe(column: str, dtype: str, dimensions: int | None) -> str:
    if dimensions is not None:
        return type_name(_spec(column, dtype, dimensions).arrow_type)
    element = _spec(column, dtype, 8).arrow_type.value_type
    return f"fixed_size_list<{element}>[the pooled width{' / 8' if dtype in ('binary', 'ubinary') else ''}]"


def columns_to_read(schema: pa.Schema, expected: Expected | None) -> list[str]:
    """The float vector columns of a file whose type is right: what `file_problems` needs decoded."""
    return [c for c, dtype, dims in expected or [] if dtype in NORM_TOLERANCE and c in schema.names
            and _type_fits(schema.field(c).type, dtype, dims)]


def _type_fits(actual: pa.DataType, dtype: str, dimensions: int | None) -> bool:
    want = _spec("x", dtype, dimensions or 8).arrow_type
    if not pa.types.is_fixed_size_list(actual) or actual.value_type != want.value_type:
        return False
    return dimensions is None or actual.list_size == want.list_size


def file_problems(path: str, schema: pa.Schema, table: pa.Table, expected: Expected | None
                  ) -> tuple[list[str], dict[str, list[Any]]]:
    """(problems, {column: [type, width]} of the pooled-width columns) of one data file: the fingerprint's vector
    columns present with their types, no other fixed-size list column, float vectors L2-unit (`table` holds the
    `columns_to_read`)."""
    if expected is None:
        return [], {}
    problems, widths = [], {}
    names = [c for c, _, _ in expected]
    for column, dtype, dims in expected:
        if column not in schema.names:
            problems.append(f"{path}: no vector column {column!r} (the fingerprint's {_describe(column, dtype, dims)})")
            continue
        actual = schema.field(column).type
        if not _type_fits(actual, dtype, dims):
            problems.append(f"{path}: column {column!r} is {type_name(actual)}, the fingerprint says "
                            f"{_describe(column, dtype, dims)}")
            continue
        if dims is None:
            widths[column] = [type_name(actual), actual.list_size]
        if column in table.column_names:
            problems += _norm_problems(path, column, table.column(column).combine_chunks(), NORM_TOLERANCE[dtype])
    for field in schema:
        if pa.types.is_fixed_size_list(field.type) and field.name not in names:
            problems.append(f"{path}: vector column {field.name!r} is not one of the fingerprint's {names}")
    return problems, widths


def _norm_problems(path: str, column: str, values: pa.FixedSizeListArray, tolerance: float) -> list[str]:
    if values.null_count:
        return [f"{path}: {values.null_count} row(s) of {column!r} hold no vector"]
    matrix = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(values), -1)
    norms = np.linalg.norm(matrix, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1) <= tolerance))
    if not len(bad):
        return []
    return [f"{path}: {len(bad)} vector(s) of {column!r} are not L2-unit (row {bad[0]}: norm {norms[bad[0]]:.6g}, "
            f"tolerance {tolerance})"]


def width_problems(found: list[tuple[str, dict[str, list[Any]]]]) -> list[str]:
    """From each file's (path, pooled-width columns) in commit order: the files whose width of a column differs
    from the one most files have."""
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    first: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for i, (_, widths) in enumerate(found):
        for column, (kind, _) in widths.items():
            seen[column][kind] += 1
            first[column].setdefault(kind, i)
    problems = []
    for column, counts in seen.items():
        common = max(counts, key=lambda kind: (counts[kind], -first[column][kind]))
        problems += [f"{path}: column {column!r} is {widths[column][0]}, the output's other files have {common}"
                     for path, widths in found if column in widths and widths[column][0] != common]
    return problems
