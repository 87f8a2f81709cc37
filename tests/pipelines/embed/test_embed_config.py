"""The embedding job's config: a table with a float16 vector column is refused before any work (Iceberg has no
16-bit float), in one line naming the column; the same columns without a table, or as float32, are accepted."""

import pytest
from pydantic import ValidationError

from pipelines.embed.config import EmbedJobConfig
from pipelines.reindex.config import ReindexJobConfig


def config(section: str, **output):
    return {"input": {"paths": ["in/*.parquet"], "id_column": "id"}, "model": {"path": "m"}, section: {"path": "out", **output}}


@pytest.mark.parametrize("schema, section", [(EmbedJobConfig, "output"), (ReindexJobConfig, "index")])
def test_a_table_refuses_float16_columns_naming_them(schema, section):
    vectors = [{"column": "h", "dtype": "float16"}, {"column": "q", "dimensions": 8, "dtype": "int8"}]
    with pytest.raises(ValidationError) as refused:
        schema.model_validate(config(section, vectors=vectors, table={"name": "docs"}))
    (error,) = refused.value.errors()
    assert "vector column(s) h (float16)" in error["msg"] and "use dtype float32" in error["msg"]
    with pytest.raises(ValidationError, match=r"vector column\(s\) embedding \(float16\)"):
        schema.model_validate(config(section, vector_dtype="float16", table={"name": "docs"}))
    schema.model_validate(config(section, vectors=vectors))
    schema.model_validate(config(section, vectors=[{**vectors[0], "dtype": "float32"}, vectors[1]],
                                 table={"name": "docs"}))
