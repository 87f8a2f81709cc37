"""What every job's config shares, and loading one: typed, strict, validated before any work starts.

Each job's own schema lives in its package (`pipelines/embed/config.py`, …) and builds on these bases.
YAML files only fill the schema in; `--set a.b=c` overrides edit the loaded mapping before validation, so an
override is checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WrapValidator, model_validator
from pydantic_core import PydanticCustomError

from common.errors import EmbedrankError


class ConfigError(EmbedrankError, ValueError):
    """A user mistake in a config file or an override; the message names file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One column a stage needs: `role` names it downstream; `kind` says how a bad value is rejected.

    `id` fields must be non-null (cast to string); `text` fields must be non-empty strings.
    An id field with no column gets generated ids `<relative path>:<row>` (`GENERATED_IDS`).
    """

    role: str
    column: str | None
    kind: Literal["id", "text"]


GENERATED_IDS = "common-prefix-relative-path:row"
"""The id scheme of an id field with no column: `<path relative to the common prefix of every input's folder>:<row>`
(`pipelines.input.plan`, `pipelines.input.reading`); named in the job fingerprint, so a change of scheme is refused.
A JSONL file cut into byte ranges (`jsonl_item_mb`) has no file-wide row number without a scan: its rows are
`<path>@<byte offset of the line>` instead, so with generated ids `jsonl_item_mb` is in the fingerprint too."""

ROW_SETTINGS = ("format", "on_bad_file")
"""A source's settings besides its `*_column(s)` that change which rows exist or what they carry."""

MIB = 1 << 20


class SourceConfig(Strict):
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
    jsonl_item_mb: float = Field(
        64.0,
        gt=0,
        description="JSONL: target MiB per work item. A larger file is cut into equal byte ranges, planned from its "
        "size alone; each range owns the lines that start in it (each line is read once, by one item). A file no "
        "larger is one item, as is a compressed one. With generated ids (no id column) a cut file's ids are "
        "`<path>@<byte offset>`, so the setting is then part of the job fingerprint.",
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

    @property
    def jsonl_item_bytes(self) -> int:
        """`jsonl_item_mb` in bytes (at least one)."""
        return max(1, int(self.jsonl_item_mb * MIB))

    def id_scheme(self) -> str:
        """How row ids are made: from the id column(s), or generated from path and row (`GENERATED_IDS`)."""
        generated = any(fs.kind == "id" and fs.column is None for fs in self.fields())
        return GENERATED_IDS if generated else "id columns"

    def row_settings(self) -> dict[str, Any]:
        """What a job fingerprint records of this source: every setting that changes which rows exist, which text
        is read or what a row carries (the format, the bad-file policy, every `*_column(s)` setting) and the id
        scheme, so that resuming with another value is refused instead of mixing two fields in one output.

        Where the files are (`paths`, `storage_options`) and how work is cut (`rows_per_item`, a join's
        partitions) are left out: a reindex reads a new snapshot path every run, and the plan's items already
        check the files (a resume whose items are cut otherwise is refused by the plan check). The one exception
        is `jsonl_item_mb` of a JSONL source with generated ids: a cut file's ids are byte offsets
        (`GENERATED_IDS`), so the cut changes ids there."""
        names = [n for n in type(self).model_fields if n in ROW_SETTINGS or n.endswith(("_column", "_columns"))]
        settings = {n: getattr(self, n) for n in names}
        if self.format == "jsonl" and self.id_scheme() == GENERATED_IDS:
            settings["jsonl_item_mb"] = self.jsonl_item_mb
        return {**settings, "id_scheme": self.id_scheme()}


def storage_options_field(options_of: str) -> Any:
    """The `storage_options` field of a model, output or index section: null means the input's
    (`JobConfigBase.own_or_input_options`)."""
    return Field(None, description=f"fsspec options for {options_of}; null = the input's. Never recorded.")


TARGET_FILE_MB = 512.0
"""Default largest data file: lakehouse readers (Spark, Trino, DuckDB) and S3 listings do best with few files of
128 MB-1 GB; an item (50,000 rows by default) of 1024-d float32 vectors is ~200 MB, so it stays one file."""


def target_file_mb_field() -> Any:
    return Field(TARGET_FILE_MB, gt=0, description=(
        "Largest data file in MiB (Parquet, zstd; row groups of ~128 MiB). A committed work item is one data file "
        "(per partition value) unless its rows exceed this: then several, each ≤ this. An item that reached the "
        "writer in several pieces (Ray Data splits blocks; retries) is merged into such files before it commits."))


def model_path_field(family: str) -> Any:
    return Field(description="Hugging Face hub id, local directory, or object-store URL (s3://…/model/) "
                 f"of a {family} model; a URL is fetched once per node into a local cache.")


class ModelConfigBase(Strict):
    """The fields every model section shares: which model, where to fetch it, its precision, its batching.

    Each family declares `path` itself, so that its description names the family."""

    path: str
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    storage_options: dict[str, Any] | None = storage_options_field("a model.path in object storage (s3://…)")
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
        description="What one forward pass costs beyond its tokens, in tokens: micro-batches of sorted rows are cut "
        "where padding a short row would cost more than a pass of its own. Null = the device's default (48 on CPU, "
        "8192 on GPU).",
    )


AUTO = "auto"


def auto_or(inner: Any) -> Any:
    """`auto` or a value of `inner` (a constrained type); a bad value fails with `inner`'s own message, named by
    the field alone (no union branches in the message)."""
    adapter = TypeAdapter(inner)

    def check(value: Any, handler: Any) -> Any:
        if value == AUTO:
            return AUTO
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            message = first["msg"]
            if first["type"].endswith(("_parsing", "_type")):
                message = "Input should be 'auto' or " + message.removeprefix("Input should be ")
            raise PydanticCustomError(first["type"], message.replace("{", "(").replace("}", ")")) from None

    return Annotated[Literal["auto"] | inner, WrapValidator(check)]


ReplicaCount = auto_or(Annotated[int, Field(ge=1)])
CpuCount = auto_or(Annotated[float, Field(gt=0)])
ThreadCount = auto_or(Annotated[int, Field(ge=1)])


class ComputeConfig(Strict):
    """Actor pool sizing and resources. `auto` values are fitted to the Ray cluster when a run starts
    (`pipelines.resources`): printed then, recorded in `_job.json`; explicit values always win."""

    min_replicas: ReplicaCount = Field(
        AUTO, description="Smallest size of the model actor pool; auto = max_replicas on the embedded local Ray "
        "(the machine is the job's own), else 1 (a shared or autoscaled cluster: the pool grows while work is "
        "queued).")
    max_replicas: ReplicaCount = Field(
        AUTO, description="Largest size of the model actor pool (autoscaled). auto: with num_gpus > 0, one replica "
        "per num_gpus GPUs that Ray reports; on CPU, the cores the read, tokenize and write tasks leave (one CPU in "
        "8 stays with them, at least one) in replicas of up to 8 threads. Counted on the nodes present at start.")
    num_gpus: float = Field(0, ge=0, description="GPUs per model replica; 0 runs on CPU.")
    num_cpus: CpuCount = Field(
        AUTO, description="CPUs reserved per model replica (a CPU replica runs num_threads threads). "
        "auto: on CPU, the cores left to replicas divided among them (see max_replicas); with GPUs, 1.")
    num_threads: ThreadCount = Field(
        AUTO, description="Torch threads of a CPU replica (a GPU replica ignores it). auto: its num_cpus, rounded "
        "down, at least one; where num_cpus is auto too and each node hosts one replica, the node's CPUs kept for the "
        "read, tokenize and write tasks as well (they keep them reserved in Ray, but use them a small part of the "
        "time): 2 cores → 1 CPU, 2 threads.")
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
        0.5, gt=0, description="CPUs reserved per read, tokenize and write task: a node runs at most its free CPUs "
        "÷ this many at once, each in a Ray worker process of its own (started once per job, seconds of CPU "
        "each). 0.5 gives two per free CPU; lower it for stores whose reads wait on the network.",
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> ComputeConfig:
        if AUTO not in (self.min_replicas, self.max_replicas) and self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is smaller than min_replicas ({self.min_replicas})"
            )
        return self

    @property
    def auto_fields(self) -> list[str]:
        """The fields still `auto` (none once fitted to a cluster)."""
        return [f for f in ("min_replicas", "max_replicas", "num_cpus", "num_threads") if getattr(self, f) == AUTO]

    @property
    def replica_cpus(self) -> float:
        """`num_cpus` as a number: 1 while it is still `auto` (the lifecycle fits it before any replica starts)."""
        return 1.0 if self.num_cpus == AUTO else self.num_cpus


class RunConfig(Strict):
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
    block_mb: float | None = Field(
        None, gt=0, description="Ray Data's largest block (`DataContext.target_max_block_size`) for this job's "
        "graphs, in MiB; null = Ray's default (128). Smaller blocks lower each task's memory (about 2 × CPUs × this "
        "per node) but split work items into more pieces, which are merged before they commit."
    )
    allow_unconditional_store: bool = Field(
        False, description="Run on an object store that ignores conditional writes (If-None-Match / If-Match), "
        "which a probe at start detects and refuses by default: writers are then not fenced, so only set it if no "
        "second driver can ever run on the output."
    )


class JobConfigBase(Strict):
    """What every job shares beyond its sections: a section's `storage_options: null` means the input's, and
    the model and compute sections give the settings each model replica takes."""

    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Actor pool sizing and resources.")
    run: RunConfig = Field(default_factory=RunConfig, description="Driver behaviour.")

    def own_or_input_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """A section's fsspec options: its own, or the input's where it leaves them null (a copy either way)."""
        return dict(self.input.storage_options if options is None else options)

    @property
    def model_storage_options(self) -> dict[str, Any]:
        return self.own_or_input_options(self.model.storage_options)

    @property
    def output_storage_options(self) -> dict[str, Any]:
        """Of the `output` section (embed, rerank; a reindex writes to its `index`)."""
        return self.own_or_input_options(self.output.storage_options)

    def _replica_fields(self, model_digest: str | None) -> dict[str, Any]:
        """The `ReplicaSettings` fields; `model_digest`: the fingerprint's, which a URL model must still have."""
        m, c = self.model, self.compute
        return {"path": m.path, "revision": m.revision, "dtype": m.dtype, "num_gpus": c.num_gpus,
                "num_cpus": c.replica_cpus, "threads": None if c.num_threads == AUTO else c.num_threads,
                "max_batch_tokens": m.max_batch_tokens, "batch_overhead_tokens": m.batch_overhead_tokens,
                "storage_options": self.model_storage_options, "model_digest": model_digest}


JobConfig = TypeVar("JobConfig", bound=BaseModel)


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
                *, schema: type[JobConfig]) -> JobConfig:
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


class CatalogConfig(Strict):
    """An Apache Iceberg catalog, as pyiceberg opens it (`pyiceberg.catalog.load_catalog(name, **properties)`)."""

    name: str = Field(
        "embedrank", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
        description="The catalog's name; pyiceberg also reads its properties from ~/.pyiceberg.yaml and "
        "PYICEBERG_CATALOG__<NAME>__<PROPERTY> environment variables, where credentials belong (the output's "
        "_job.json records this config without credential-named properties and without a URI's password; "
        "`embedrank publish` and `gc` get those from there).",
    )
    properties: dict[str, str] = Field(
        default_factory=dict,
        description="pyiceberg catalog properties: `type` (sql, rest, glue, hive, …), `uri`, `warehouse`, `s3.*`, …. "
        "S3 FileIO properties missing here are filled from the output's storage options.",
    )


class TableConfig(Strict):
    """`output.table` / `index.table`: publish the committed output as an Apache Iceberg table as well (the Parquet
    output and its commit records stay the source of truth; the table is a projection of them)."""

    catalog: CatalogConfig | None = Field(
        None, description="null: the embedded SQL catalog on SQLite in `<output>/_iceberg/` (local outputs only).",
    )
    namespace: str = Field("embedrank", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="The table's namespace.")
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                      description="The table's name; rejects go to `<name>_rejects`.")
    publish_every_s: float = Field(
        300.0, gt=0, description="While an embed job runs, publish the items committed so far this often (one "
        "snapshot of whole items, each expiring the progress snapshots before the last); always at the end.",
    )
