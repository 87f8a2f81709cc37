"""The embedding job's config: the corpus, the embedding model and its semantics, the output."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from actors.quantize import CALIBRATED, VectorSpec
from actors.settings import EmbedSettings
from common.columns import CONTENT_HASH, EMBEDDING, ID, N_TOKENS, TEXT, TRUNCATED
from pipelines.config import (FieldSpec, JobConfigBase, ModelConfigBase, SourceConfig, Strict, TableConfig,
                              model_path_field, storage_options_field, target_file_mb_field)


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


VectorDtype = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]


class VectorOutput(Strict):
    """One stored vector column, computed from the same forward pass as every other."""

    column: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="Output column name.")
    dimensions: int | None = Field(
        None, gt=0, description="Matryoshka width: the first N values of the pooled vector, L2 re-normalised; "
        "null = the pooled width (model.dimensions, else the model's size).")
    dtype: VectorDtype = Field(
        "float32", description="Stored element type: float32/float16; int8/uint8 (per-dimension ranges cut in 255 "
        "steps, as sentence-transformers' quantize_embeddings); binary (int8) / ubinary (uint8): packed sign bits "
        "(value > 0), dimensions/8 bytes.")
    ranges: list[list[float]] | None = Field(
        None, description="int8/uint8 only: [[min per dimension], [max per dimension]] (needs `dimensions`). Null = "
        "calibrated once per output from the first `output.calibration_rows` documents of the plan and recorded in "
        "_job.json and the fingerprint (resumes and reindex versions reuse them).")

    @model_validator(mode="after")
    def _ranges_fit(self) -> "VectorOutput":
        if self.ranges is None:
            return self
        if self.dtype not in CALIBRATED:
            raise ValueError(f"vector {self.column!r}: ranges apply to int8/uint8 only, not {self.dtype}")
        if self.dimensions is None or len(self.ranges) != 2 or any(len(r) != self.dimensions for r in self.ranges):
            raise ValueError(f"vector {self.column!r}: ranges must be [[min]*dimensions, [max]*dimensions] with "
                             "dimensions set")
        return self

    def spec(self) -> VectorSpec:
        ranges = None if self.ranges is None else (tuple(self.ranges[0]), tuple(self.ranges[1]))
        return VectorSpec(self.column, self.dimensions, self.dtype, ranges)


RESERVED_COLUMNS = (ID, N_TOKENS, TRUNCATED, CONTENT_HASH)


class VectorOutputs(Strict):
    """Which vector columns an output stores: one `embedding` of `vector_dtype` (the default), or `vectors`."""

    vector_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Stored element type of the single `embedding` column (without `vectors`).")
    vectors: list[VectorOutput] | None = Field(
        None, min_length=1, description="Several vector columns from one forward pass (Matryoshka widths, "
        "float16/int8/uint8/binary/ubinary), each `{column, dimensions, dtype}`; null = one `embedding` column "
        "of `vector_dtype` at the pooled width.")
    calibration_rows: int = Field(
        1000, gt=1, description="int8/uint8 columns without `ranges`: how many documents (the plan's first) "
        "calibrate each dimension's [min, max].")

    @model_validator(mode="after")
    def _vectors_fit(self) -> "VectorOutputs":
        if self.vectors is None:
            return self
        if "vector_dtype" in self.model_fields_set:
            raise ValueError("set either vector_dtype (one `embedding` column) or vectors, not both")
        names = [v.column for v in self.vectors]
        if len(set(names)) != len(names):
            raise ValueError(f"vectors: column names must be unique, got {names}")
        clash = sorted(set(names) & set(RESERVED_COLUMNS))
        if clash:
            raise ValueError(f"vectors: {clash} name columns the output has already")
        return self

    @model_validator(mode="after")
    def _table_takes_no_half_floats(self) -> "VectorOutputs":
        """Iceberg has no 16-bit float: refused here, before any work, rather than when the run publishes."""
        if getattr(self, "table", None) is None:
            return self
        half = ([v.column for v in self.vectors if v.dtype == "float16"] if self.vectors is not None
                else ["embedding"] if self.vector_dtype == "float16" else [])
        if half:
            raise ValueError(f"table: Iceberg has no 16-bit float type, so vector column(s) {', '.join(half)} "
                             "(float16) cannot be published: use dtype float32 for them, or int8/uint8/binary/ubinary, "
                             "or drop the table")
        return self

    def vector_specs(self) -> list[VectorSpec] | None:
        """The configured columns (None: the single default column)."""
        return None if self.vectors is None else [v.spec() for v in self.vectors]

    def vector_column_names(self) -> list[str]:
        return [EMBEDDING] if self.vectors is None else [v.column for v in self.vectors]

    def needs_calibration(self) -> list[VectorOutput]:
        """Calibrated columns whose ranges are not known yet."""
        return [v for v in self.vectors or [] if v.dtype in CALIBRATED and v.ranges is None]

    def with_ranges(self, ranges: dict[str, list[list[float]]]):
        """A copy whose calibrated columns carry `ranges` (column → [[min], [max]]) and their width."""
        vectors = [v.model_copy(update={"ranges": ranges[v.column], "dimensions": len(ranges[v.column][0])})
                   if v.column in ranges else v for v in self.vectors or []]
        return self.model_copy(update={"vectors": vectors})

    def vectors_fingerprint(self) -> dict[str, Any]:
        """What the fingerprint adds for `vectors` (nothing without: the default output's fingerprint is as
        before). Ranges by digest (`_job.json` keeps the values)."""
        if self.vectors is None:
            return {}
        from actors.quantize import ranges_digest

        out: dict[str, Any] = {"vectors": [{"column": v.column, "dimensions": v.dimensions, "dtype": v.dtype,
                                            **({"ranges": ranges_digest(v.ranges)} if v.dtype in CALIBRATED else {})}
                                           for v in self.vectors]}
        if any(v.dtype in CALIBRATED for v in self.vectors):
            out["calibration_rows"] = self.calibration_rows
        return out


class OutputConfig(VectorOutputs):
    path: str = Field(description="Output root (local path or fsspec URL); holds data/, _commits/, _rejects/.")
    partition_by: str | None = Field(
        None,
        description="A pass-through column whose value names a Hive-style folder of data/: "
        "`data/<column>=<value>/…`, the value percent-encoded (nulls: __HIVE_DEFAULT_PARTITION__); the column "
        "stays in the files too. A row whose encoded value exceeds 200 bytes is rejected.",
    )
    target_file_mb: float = target_file_mb_field()
    storage_options: dict[str, Any] | None = storage_options_field("the output filesystem")
    table: TableConfig | None = Field(None, description="Also publish the output as an Apache Iceberg table.")


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
        clash = sorted(set(self.output.vector_column_names()) & set(self.input.passthrough_columns))
        if self.output.vectors is not None and clash:
            raise ValueError(f"output.vectors: {clash} are pass-through columns too")
        return self

    def replica_settings(self, model_digest: str | None) -> EmbedSettings:
        """What each embedding replica loads and how it runs."""
        return EmbedSettings(**self._replica_fields(model_digest), dimensions=self.model.dimensions,
                             vector_dtype=self.output.vector_dtype, vectors=self.output.vector_specs(),
                             packed=self.model.packed,
                             token_buckets=self.model.token_buckets)
