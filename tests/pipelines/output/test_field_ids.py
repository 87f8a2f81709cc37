"""Parquet field ids of the committed files (`pipelines.output.field_ids`): Iceberg's fresh ids for the columns,
as pyiceberg (written apart from this code) assigns them to a new table, written into every file's Parquet schema.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.output.field_ids import FIELD_ID, field_ids, with_field_ids
from pipelines.output.pieces import put_piece
from pipelines.storage import Storage

NESTED = pa.schema([
    ("id", pa.string()),
    ("embedding", pa.list_(pa.float32(), 4)),
    ("n_tokens", pa.int32()),
    ("meta", pa.struct([("tags", pa.list_(pa.string())),
                        ("attrs", pa.map_(pa.string(), pa.struct([("x", pa.int64())])))])),
    ("spans", pa.large_list(pa.int64())),
], metadata={b"embedrank.fingerprint": b"{}"})


def iceberg_ids(schema: pa.Schema) -> dict[str, int]:
    """pyiceberg's ids for a new table of these columns: its fresh assignment, by full column name."""
    from pyiceberg.catalog import Catalog
    from pyiceberg.schema import assign_fresh_schema_ids, index_name_by_id

    fresh = assign_fresh_schema_ids(Catalog._convert_schema_if_needed(schema))
    return {name: field_id for field_id, name in index_name_by_id(fresh).items()}


def stamped(field: pa.Field) -> int:
    return int(field.metadata[FIELD_ID])


def test_the_ids_are_the_ones_a_new_iceberg_table_gives_the_columns():
    numbered = with_field_ids(NESTED)
    assert field_ids(numbered) == iceberg_ids(NESTED)
    # by hand: a struct's own fields first (1..5), then each field's nested ids in column order
    assert [stamped(f) for f in numbered] == [1, 2, 3, 4, 5]
    assert stamped(numbered.field("embedding").type.value_field) == 6
    meta = numbered.field("meta").type
    assert [stamped(f) for f in meta] == [7, 8]
    assert stamped(meta.field("tags").type.value_field) == 9
    attrs = meta.field("attrs").type
    assert (stamped(attrs.key_field), stamped(attrs.item_field)) == (10, 11)
    assert stamped(attrs.item_type.field("x")) == 12
    assert stamped(numbered.field("spans").type.value_field) == 13
    # nothing else changes: types (fixed size kept), nullability, the schema's metadata
    assert numbered.equals(NESTED) and numbered.metadata == NESTED.metadata
    assert with_field_ids(numbered).equals(numbered, check_metadata=True)  # any ids there are replaced alike


def test_a_written_piece_carries_the_ids_in_its_parquet_schema_and_the_same_bytes_each_time(tmp_path):
    store = Storage(str(tmp_path))
    rows = pa.table({"id": ["a", "b"], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.arange(8, dtype=np.float32)), 4), "n_tokens": pa.array([3, 4], pa.int32())})
    fp = json.dumps({"model": "m"})
    ref = put_piece(store, "data", "item-0-1", rows, fp)
    again = put_piece(store, "data", "item-0-1", rows, fp)
    assert (again.path, again.sha256) == (ref.path, ref.sha256)
    parquet = pq.ParquetFile(store.path(ref.path)).schema  # the file's own schema elements
    text = str(parquet)
    for line in ("binary field_id=1 id", "group field_id=2 embedding (List)", "float field_id=4 element",
                 "int32 field_id=3 n_tokens"):
        assert line in text, text
    got = pq.read_table(store.path(ref.path))
    assert got.equals(rows) and field_ids(got.schema) == iceberg_ids(rows.schema)
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), 4)  # still a fixed-size list
