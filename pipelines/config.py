"""The job config schema: typed, strict, validated before any work starts.

YAML files only fill the schema in; `--set a.b=c` overrides edit the loaded
mapping before validation, so an override is checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import EmbedrankError


class ConfigError(EmbedrankError, ValueError):
    """A user mistake in a config file or an override; the message names file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One column a stage needs: `role` names it downstream; `kind` says how a bad value is rejected.

    `id` fields must be non-null (cast to string); `text` fields must be non-empty strings.
    An id field with no column gets generated ids `<relative path>:<row>`.
    """

    role: str
    column: str | None
    kind: Literal["id", "text"]


class SourceConfig(_Strict):
    """Files of one corpus and how to read them; subclasses say which columns they need."""

    paths: list[str] = Field(
        min_length=1,
        description="Globs of input shards: local paths, s3://…, or any fsspec URL. "
        "A directory means every file of the input format under it.",
    )
    format: Literal["parquet", "jsonl"] = Field("parquet", description="File format of every input shard.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for the input filesystem (e.g. endpoint_url). Credentials come from "
        "the standard AWS chain or the environment and are never required here; never recorded.",
    )
    rows_per_item: int = Field(
        50_000,
        gt=0,
        description="Target rows per work item; Parquet files are split at row-group boundaries. "
        "A work item is the unit of commit and of resume.",
    )
    on_bad_file: Literal["reject", "fail"] = Field(
        "reject",
        description="A Parquet file that cannot be decoded (truncated, corrupt) or lacks the configured columns: "
        "`reject` records it in _rejects/ with its work item and goes on; `fail` stops the job. Store "
        "errors (network, permissions) always stop the job and never reject data.",
    )

    def fields(self) -> list[FieldSpec]:
        raise NotImplementedError

    @property
    def extra_columns(self) -> list[str]:
        return []


class InputConfig(SourceConfig):
    id_column: str | None = Field(
        None, description="Column holding document ids; null makes ids `<relative path>:<row>`."
    )
    text_column: str = Field("text", description="Column holding the text to embed.")
    passthrough_columns: list[str] = Field(
        default_factory=list, description="Input columns copied unchanged into every output row."
    )

    def fields(self) -> list[FieldSpec]:
        return [FieldSpec("id", self.id_column, "id"), FieldSpec("text", self.text_column, "text")]

    @property
    def extra_columns(self) -> list[str]:
        return list(self.passthrough_columns)


MODEL_STORAGE_OPTIONS_DESCRIPTION = (
    "fsspec options for a model.path in object storage (s3://…); null = the input's. Never recorded.")


BATCH_OVERHEAD_TOKENS_DESCRIPTION = (
    "What one forward pass costs beyond its tokens, in tokens: micro-batches of sorted rows are cut where padding "
    "a short row would cost more than a pass of its own. Null = the device's default (48 on CPU, 8192 on GPU)."
)


class ModelConfig(_Strict):
    path: str = Field(description="Hugging Face hub id, local directory, or object-store URL (s3://…/model/) "
                      "of a Qwen3-Embedding model; a URL is fetched once per node into a local cache.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    storage_options: dict[str, Any] | None = Field(None, description=MODEL_STORAGE_OPTIONS_DESCRIPTION)
    dimensions: int | None = Field(
        None, gt=0, description="MRL: keep the first N dimensions, then re-normalise; null = full size."
    )
    instruction: str | None = Field(
        None,
        description="Task instruction. Null embeds documents as they are; when set every text is a "
        "query and is formatted `Instruct: {instruction}\\nQuery:{text}`.",
    )
    max_length: int = Field(8192, ge=2, description="Tokens per text, the appended end token included.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    max_batch_tokens: int = Field(
        16384,
        gt=0,
        description="Token budget of one forward pass, padding counted (rows × longest row).",
    )
    batch_overhead_tokens: int | None = Field(
        None,
        ge=0,
        description=BATCH_OVERHEAD_TOKENS_DESCRIPTION,
    )


class OutputConfig(_Strict):
    path: str = Field(description="Output root (local path or fsspec URL); holds data/, _commits/, _rejects/.")
    vector_dtype: Literal["float32", "float16"] = Field("float32", description="Stored element type of vectors.")
    partition_by: str | None = Field(
        None,
        description="A pass-through column whose value names a Hive-style folder of data/: "
        "`data/<column>=<value>/…`, the value percent-encoded (nulls: __HIVE_DEFAULT_PARTITION__); the column "
        "stays in the files too. A row whose encoded value exceeds 200 bytes is rejected.",
    )
    storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options for the output filesystem; null = the input's. Never recorded."
    )


class ComputeConfig(_Strict):
    min_replicas: int = Field(1, ge=1, description="Smallest size of the model actor pool.")
    max_replicas: int = Field(1, ge=1, description="Largest size of the model actor pool (autoscaled).")
    num_gpus: float = Field(0, ge=0, description="GPUs per model replica; 0 runs on CPU.")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per model replica.")
    estimate_tokens_per_gpu_s: float = Field(
        20_000, gt=0, description="Tokens one GPU replica processes per second, for the dry run's GPU-hours "
        "estimate (measure yours: the run report and progress lines give tokens/s).",
    )
    estimate_usd_per_gpu_hour: float = Field(
        1.0, ge=0, description="Price of one GPU-hour, for the dry run's cost estimate.",
    )
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type a replica needs (e.g. L4, A10G, A100, H100): places 4B/8B "
        "replicas on large-GPU nodes; null = any GPU.",
    )
    batch_rows: int = Field(
        256, gt=0, description="Rows handed to a replica per call; sorted and cut by the token budget inside."
    )
    io_num_cpus: float = Field(
        0.25, gt=0, description="CPUs reserved per read, tokenize and write task."
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ComputeConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is smaller than min_replicas ({self.min_replicas})"
            )
        return self


class RunConfig(_Strict):
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between progress lines.")
    lock_stale_s: float = Field(
        600.0, gt=0, description="A writer lock whose heartbeat is older than this belongs to a dead job and is "
        "taken over; heartbeats are written every fifth of it."
    )
    stall_timeout_s: float = Field(
        1800.0, gt=0, description="Fail the job, naming the stuck stage and stopping the pipeline, when no work "
        "reaches the driver for this long (a hung actor, task or store). Committed work is kept.",
    )
    startup_timeout_s: float = Field(
        3600.0, gt=0, description="The same limit for the first output of a run, which waits for actors to start "
        "and load their model (downloads included).",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join; null = RAY_ADDRESS if set, else start a local Ray."
    )


class EmbedJobConfig(_Strict):
    input: InputConfig = Field(description="Where the corpus is and how to read it.")
    model: ModelConfig = Field(description="The embedding model and its semantics.")
    output: OutputConfig = Field(description="Where committed vectors go.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Actor pool sizing and resources.")
    run: RunConfig = Field(default_factory=RunConfig, description="Driver behaviour.")

    @model_validator(mode="after")
    def _partition_column_passes_through(self) -> "EmbedJobConfig":
        column = self.output.partition_by
        if column is not None and column not in self.input.passthrough_columns:
            raise ValueError(f"output.partition_by {column!r} must be one of input.passthrough_columns "
                             f"{list(self.input.passthrough_columns)}")
        return self

    @property
    def output_storage_options(self) -> dict[str, Any]:
        opts = self.output.storage_options
        return dict(self.input.storage_options if opts is None else opts)

    @property
    def model_storage_options(self) -> dict[str, Any]:
        opts = self.model.storage_options
        return dict(self.input.storage_options if opts is None else opts)


class IndexConfig(_Strict):
    path: str = Field(description="Index root (local path or fsspec URL): holds v000001/, v000002/, … and "
                      "_CURRENT.json, which names the version readers see.")
    vector_dtype: Literal["float32", "float16"] = Field("float32", description="Stored element type of vectors.")
    storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options for the index filesystem; null = the input's. Never recorded."
    )
    diff_partitions: int = Field(
        16, gt=0, description="Hash partitions of the joins on id (snapshot vs current version) run on the cluster.",
    )


class ReindexJobConfig(_Strict):
    """A scheduled reindex: the next version of an index from a new snapshot of the corpus."""

    input: InputConfig = Field(description="The new snapshot of the corpus; input.id_column is required.")
    model: ModelConfig = Field(description="The embedding model and its semantics.")
    index: IndexConfig = Field(description="The index root whose next version this run publishes.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Actor pool sizing and resources.")
    run: RunConfig = Field(default_factory=RunConfig, description="Driver behaviour.")

    @model_validator(mode="after")
    def _needs_ids(self) -> "ReindexJobConfig":
        if self.input.id_column is None:
            raise ValueError("input.id_column is required for reindexing: documents are matched across snapshots "
                             "by id (generated `<file>:<row>` ids would change whenever a row moves)")
        return self

    @property
    def index_storage_options(self) -> dict[str, Any]:
        opts = self.index.storage_options
        return dict(self.input.storage_options if opts is None else opts)

    def embed_config(self, version_url: str) -> EmbedJobConfig:
        """The embedding job that builds one version (same fingerprint rules as `embedrank embed`)."""
        return EmbedJobConfig(
            input=self.input, model=self.model, compute=self.compute, run=self.run,
            output=OutputConfig(path=version_url, vector_dtype=self.index.vector_dtype,
                                storage_options=self.index_storage_options),
        )


DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class RerankInputConfig(SourceConfig):
    query_id_column: str = Field("query_id", description="Column holding query ids.")
    query_column: str = Field("query", description="Column holding query texts.")
    doc_id_column: str = Field("doc_id", description="Column holding candidate document ids.")
    text_column: str | None = Field(
        "text", description="Column holding candidate document texts; null when `documents` supplies them."
    )

    def fields(self) -> list[FieldSpec]:
        fields = [FieldSpec("query_id", self.query_id_column, "id"), FieldSpec("query", self.query_column, "text"),
                  FieldSpec("doc_id", self.doc_id_column, "id")]
        return fields + ([FieldSpec("text", self.text_column, "text")] if self.text_column else [])


class DocumentsConfig(SourceConfig):
    id_column: str = Field("doc_id", description="Column holding document ids (joined with input.doc_id_column).")
    text_column: str = Field("text", description="Column holding document texts.")
    join_partitions: int = Field(16, gt=0, description="Hash partitions of the candidates ⋈ documents join.")

    def fields(self) -> list[FieldSpec]:
        return [FieldSpec("doc_id", self.id_column, "id"), FieldSpec("text", self.text_column, "text")]


class RerankModelConfig(_Strict):
    path: str = Field(description="Hugging Face hub id, local directory, or object-store URL (s3://…/model/) "
                      "of a Qwen3-Reranker model; a URL is fetched once per node into a local cache.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    storage_options: dict[str, Any] | None = Field(None, description=MODEL_STORAGE_OPTIONS_DESCRIPTION)
    instruction: str = Field(DEFAULT_RERANK_INSTRUCTION, description="Task instruction of the `<Instruct>:` line.")
    max_length: int = Field(8192, ge=64, description="Tokens per pair, template included; documents are cut.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    max_batch_tokens: int = Field(
        16384, gt=0, description="Token budget of one forward pass, padding counted (rows × longest row)."
    )
    batch_overhead_tokens: int | None = Field(
        None,
        ge=0,
        description=BATCH_OVERHEAD_TOKENS_DESCRIPTION,
    )
    share_prefix: bool = Field(
        True, description="Compute each query's shared prompt prefix once and reuse its KV cache."
    )


class RerankOutputConfig(_Strict):
    path: str = Field(description="Output root (local path or fsspec URL).")
    top_k: int | None = Field(None, gt=0, description="Keep only the best k candidates per query; null = all.")
    rank_buckets: int = Field(
        16, gt=0, description="Queries are hashed into this many buckets for ranking; a bucket is committed whole."
    )
    storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options for the output filesystem; null = the input's. Never recorded."
    )


class RerankJobConfig(_Strict):
    input: RerankInputConfig = Field(description="The candidate pairs: one (query, document) pair a row.")
    documents: DocumentsConfig | None = Field(
        None, description="Document texts by id, joined to the candidates on the cluster; null = texts inline."
    )
    model: RerankModelConfig = Field(description="The reranker model.")
    output: RerankOutputConfig = Field(description="Where committed scores and ranks go.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Actor pool sizing and resources.")
    run: RunConfig = Field(default_factory=RunConfig, description="Driver behaviour.")

    @model_validator(mode="after")
    def _one_text_source(self) -> "RerankJobConfig":
        if self.documents is None and self.input.text_column is None:
            raise ValueError("input.text_column is null, so `documents` must say where document texts are")
        if self.documents is not None and self.input.text_column is not None:
            raise ValueError("with `documents`, set input.text_column: null (texts come from the documents)")
        return self

    @property
    def output_storage_options(self) -> dict[str, Any]:
        opts = self.output.storage_options
        return dict(self.input.storage_options if opts is None else opts)

    @property
    def model_storage_options(self) -> dict[str, Any]:
        opts = self.model.storage_options
        return dict(self.input.storage_options if opts is None else opts)


JobConfig = TypeVar("JobConfig", EmbedJobConfig, RerankJobConfig, ReindexJobConfig)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (numbers, null, lists)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set output.path=s3://bucket/v1")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({exc})") from None


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_config(path: str | pathlib.Path, overrides: list[str] | tuple[str, ...] = (),
                schema: type[JobConfig] = EmbedJobConfig) -> JobConfig:
    """Read YAML, apply overrides, validate; every failure is a ConfigError naming the file and field."""
    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (input, model, output, …)")
    for assignment in overrides:
        apply_override(data, assignment)
    source = str(path) + (" (with --set overrides)" if overrides else "")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
