"""The reindex job's config: a snapshot of the corpus, the embedding model, the index root it versions."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from pipelines.config import TableConfig, storage_options_field
from pipelines.embed.config import EmbedJobConfig, EmbeddingJobBase, OutputConfig, VectorOutputs


class IndexConfig(VectorOutputs):
    path: str = Field(description="Index root (local path or fsspec URL): holds v000001/, v000002/, … and "
                      "_CURRENT.json, which names the version readers see.")
    storage_options: dict[str, Any] | None = storage_options_field("the index filesystem")
    table: TableConfig | None = Field(None, description="Also publish the index as an Apache Iceberg table: each "
                                      "published version one overwrite snapshot, tagged with its name.")
    diff_partitions: int = Field(
        16, gt=0, description="Deprecated and ignored (accepted so that older configs still load; leave it out): the "
        "diff and the carry no longer shuffle (each input file is compared with the current version's rows of the "
        "same file inside one task).",
    )


class ReindexJobConfig(EmbeddingJobBase):
    """A scheduled reindex: the next version of an index from a new snapshot of the corpus (`input`, whose
    `id_column` is required)."""

    index: IndexConfig = Field(description="The index root whose next version this run publishes.")

    @model_validator(mode="after")
    def _needs_ids(self) -> "ReindexJobConfig":
        if self.input.id_column is None:
            raise ValueError("input.id_column is required for reindexing: documents are matched across snapshots "
                             "by id (generated `<file>:<row>` ids would change whenever a row moves)")
        return self

    @property
    def index_storage_options(self) -> dict[str, Any]:
        return self.own_or_input_options(self.index.storage_options)

    def embed_config(self, version_url: str) -> EmbedJobConfig:
        """The embedding job that builds one version (same fingerprint rules as `embedrank embed`)."""
        return EmbedJobConfig(
            input=self.input, model=self.model, compute=self.compute, run=self.run,
            output=OutputConfig(path=version_url, **self.index.model_dump(
                                    include={"vector_dtype", "vectors", "calibration_rows"}
                                    & self.index.model_fields_set),
                                storage_options=self.index_storage_options),
        )
