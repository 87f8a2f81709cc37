"""Parquet field ids for the committed files: the ids an Iceberg table of the same columns gives them.

Iceberg reads a data file's columns by field id. Files without ids (registered in place, as ours are) are read
through the table's `schema.name-mapping.default`, which pyiceberg, Polars, Ray Data and DuckDB apply and some
readers do not (Daft 0.7 refuses such files). So every file we commit carries, on each Arrow field (nested list
elements, map keys and values, struct children included), the `PARQUET:field_id` that Iceberg's fresh-id
assignment gives the table's schema built from these columns (`pyiceberg.schema.assign_fresh_schema_ids`, as
Java's `TypeUtil.assignFreshIds`): a struct's own fields first, 1, 2, … in order, then each field's nested ids
in turn. The ids depend on the columns alone (names, types, order), so every file of an output carries the same
ones, a rewritten piece the same bytes, and `pipelines.output.table` builds the table's schema from a file's
ids and checks that they are the table's.

Written here over Arrow types, not through pyiceberg: the writers run on Ray workers for every piece, and must
write any column (float16 vectors, say) whether or not an Iceberg table could hold it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pyarrow as pa

FIELD_ID = b"PARQUET:field_id"
"""The Arrow field metadata key that pyarrow writes as the Parquet schema element's field_id."""


def _stamp(field: pa.Field, field_id: int) -> pa.Field:
    return field.with_metadata({**(field.metadata or {}), FIELD_ID: str(field_id).encode()})


def _fields(fields: list[pa.Field], ids: Iterator[int]) -> list[pa.Field]:
    """A struct level: its fields' ids first, then each field's nested ids (Iceberg's fresh-id order)."""
    own = [next(ids) for _ in fields]
    return [_stamp(f.with_type(_nested(f.type, ids)), i) for i, f in zip(own, fields)]


def _nested(t: pa.DataType, ids: Iterator[int]) -> pa.DataType:
    if pa.types.is_struct(t):
        return pa.struct(_fields(list(t), ids))
    if pa.types.is_map(t):
        key_id, item_id = next(ids), next(ids)
        key = _stamp(t.key_field.with_type(_nested(t.key_type, ids)), key_id)
        item = _stamp(t.item_field.with_type(_nested(t.item_type, ids)), item_id)
        return pa.map_(key, item, keys_sorted=t.keys_sorted)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        element_id = next(ids)
        element = _stamp(t.value_field.with_type(_nested(t.value_type, ids)), element_id)
        if pa.types.is_fixed_size_list(t):
            return pa.list_(element, t.list_size)
        return pa.large_list(element) if pa.types.is_large_list(t) else pa.list_(element)
    return t


def with_field_ids(schema: pa.Schema) -> pa.Schema:
    """`schema` with Iceberg's fresh field ids on every field (any ids it had replaced); its metadata kept."""
    return pa.schema(_fields(list(schema), itertools.count(1)), metadata=schema.metadata)


def field_ids(schema: pa.Schema) -> dict[str, int]:
    """Dotted column path → field id, of the fields of `schema` that carry one (Iceberg's names: a list's
    element is `<list>.element`, a map's `<map>.key` / `<map>.value`)."""
    out: dict[str, int] = {}

    def walk(field: pa.Field, path: str) -> None:
        if field.metadata and FIELD_ID in field.metadata:
            out[path] = int(field.metadata[FIELD_ID])
        t = field.type
        if pa.types.is_struct(t):
            for child in t:
                walk(child, f"{path}.{child.name}")
        elif pa.types.is_map(t):
            walk(t.key_field, f"{path}.key")
            walk(t.item_field, f"{path}.value")
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            walk(t.value_field, f"{path}.element")

    for f in schema:
        walk(f, f.name)
    return out
