"""The embedding job's config: the corpus, the embedding model and its semantics, the output."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from actors.settings import EmbedSettings
from common.columns import ID, TEXT
from pipelines.config import (FieldSpec, JobConfigBase, ModelConfigBase, SourceConfig, Strict, model_path_field,
                              storage_options_field, target_file_mb_field)


class InputConfig(SourceConfig):
    id_column: str | None = Field(
        None, description="Column holding document ids; null makes ids `<relative path>:<row>`."
    )
    text_column: str = Field("text", description="Column holding the text to embed.")
    passthrough_columns: list[str] = Field(
        default_factory=list, description="Input columns copied unchanged into every output row."
    )

    def fields(self) -> list[FieldSpec]:
        return [FieldSpec(ID, self.id_column, "id"), FieldSpec(TEXT, self.text_column, "text")]

    @property
    def extra_columns(self) -> list[str]:
        return list(self.passthrough_columns)


class ModelConfig(ModelConfigBase):
    path: str = model_path_field("Qwen3-Embedding")
    dimensions: int | None = Field(
        None, gt=0, description="MRL: keep the first N dimensions, then re-normalise; null = full size."
    )
    instruction: str | None = Field(
        None,
        description="Task instruction. Null embeds documents as they are; when set every text is a "
        "query and is formatted `Instruct: {instruction}\\nQuery:{text}`.",
    )
    max_length: int = Field(8192, ge=2, description="Tokens per text, the appended end token included.")
    packed: bool | None = Field(
        None, description="Padding-free forward passes: a micro-batch's texts concatenated into one sequence with "
        "variable-length attention (PyTorch's FlashAttention varlen kernels on CUDA, `flash_attn` if installed; SDPA "
        "with a block-diagonal mask elsewhere). Null = on where a GPU kernel runs (CUDA, bf16/fp16), off on CPU.")
    token_buckets: bool = Field(
        False, description="With `packed`: pad each packed micro-batch to one of a few fixed token counts, so shapes "
        "repeat (for CUDA graphs / compile; unmeasured so far, so off).")


class OutputConfig(Strict):
    path: str = Field(description="Output root (local path or fsspec URL); holds data/, _commits/, _rejects/.")
    vector_dtype: Literal["float32", "float16"] = Field("float32", description="Stored element type of vectors.")
    partition_by: str | None = Field(
        None,
        description="A pass-through column whose value names a Hive-style folder of data/: "
        "`data/<column>=<value>/…`, the value percent-encoded (nulls: __HIVE_DEFAULT_PARTITION__); the column "
        "stays in the files too. A row whose encoded value exceeds 200 bytes is rejected.",
    )
    target_file_mb: float = target_file_mb_field()
    storage_options: dict[str, Any] | None = storage_options_field("the output filesystem")


class EmbeddingJobBase(JobConfigBase):
    """A job that embeds a corpus with one model: `embedrank embed`, and each version `embedrank reindex` builds."""

    input: InputConfig = Field(description="Where the corpus (or this snapshot of it) is and how to read it.")
    model: ModelConfig = Field(description="The embedding model and its semantics.")


class EmbedJobConfig(EmbeddingJobBase):
    output: OutputConfig = Field(description="Where committed vectors go.")

    @model_validator(mode="after")
    def _partition_column_passes_through(self) -> "EmbedJobConfig":
        column = self.output.partition_by
        if column is not None and column not in self.input.passthrough_columns:
            raise ValueError(f"output.partition_by {column!r} must be one of input.passthrough_columns "
                             f"{list(self.input.passthrough_columns)}")
        return self

    def replica_settings(self, model_digest: str | None) -> EmbedSettings:
        """What each embedding replica loads and how it runs."""
        return EmbedSettings(**self._replica_fields(model_digest), dimensions=self.model.dimensions,
                             vector_dtype=self.output.vector_dtype, packed=self.model.packed,
                             token_buckets=self.model.token_buckets)
