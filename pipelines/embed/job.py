"""The embedding backfill job: every input row embedded into committed Parquet exactly once."""

from __future__ import annotations

from typing import Any, TextIO

from pipelines import __version__
from pipelines.embed.config import EmbedJobConfig
from pipelines.fingerprint import model_identity
from pipelines.input.plan import Plan
from pipelines.embed.calibration import calibrated, sample_items, sample_ranges
from pipelines.lifecycle import JobSpec, Prefetched, Work, recorded_config
from pipelines.output.root import OutputRoot
from pipelines.preflight import preflight_model
from pipelines.storage import Storage


def embed_fingerprint(cfg: EmbedJobConfig) -> dict[str, Any]:
    """Everything that changes the vectors or which rows they belong to (a resume with another value is refused);
    a reindex version has the same fingerprint rules."""
    m = cfg.model
    return {
        "task": "embed",
        **model_identity(cfg),
        "input": cfg.input.row_settings(),
        "pooling": "last_token",
        "normalization": "l2",
        "dimensions": m.dimensions,
        "instruction": m.instruction,
        "max_length": m.max_length,
        "vector_dtype": cfg.output.vector_dtype,
        "partition_by": cfg.output.partition_by,
        **cfg.output.vectors_fingerprint(),
        "embedrank_version": __version__,
    }


class EmbedJob(JobSpec):
    name = "embed"
    config_type = EmbedJobConfig
    progress_table = True

    def preflight(self, cfg: EmbedJobConfig) -> None:
        preflight_model(cfg.model.path, cfg.model.dimensions, cfg.model_storage_options, cfg.model.revision)

    def lock_storage(self, cfg: EmbedJobConfig) -> Storage:
        return Storage(cfg.output.path, cfg.output_storage_options)

    def prepare(self, cfg: EmbedJobConfig, plan: Plan, stream: TextIO) -> Work:
        root = OutputRoot(self.lock_storage(cfg))
        fingerprint = embed_fingerprint(cfg)
        tokenizer = Prefetched(lambda: _tokenizer_args(cfg, fingerprint))
        if cfg.output.needs_calibration():
            output = calibrated(cfg.output, [("recorded in _job.json", root.read_job_header(), "output")],
                                lambda o: embed_fingerprint(cfg.model_copy(update={"output": o})),
                                lambda needed: calibrate(cfg, plan, fingerprint, tokenizer.get(), needed), stream)
            cfg = cfg.model_copy(update={"output": output})
            fingerprint = embed_fingerprint(cfg)

        def build_graph(items, compute):
            args = tokenizer.get()  # the prefetch imported the graph module too (no torch: `actors.replicas`)
            from pipelines.embed.graph import build_embed_graph

            return build_embed_graph(cfg.model_copy(update={"compute": compute}), items, root.storage, fingerprint,
                                     tokenizer=args)

        return Work(root=root, source=cfg.input, fingerprint=fingerprint, build_graph=build_graph,
                    prefetch=tokenizer.start, recorded=recorded_config(cfg))


def calibrate(cfg: EmbedJobConfig, plan: Plan, fingerprint: dict[str, Any], tokenizer: dict[str, Any],
              needed) -> dict[str, list[list[float]]]:
    """Ranges of the `needed` int8/uint8 columns from the plan's first `output.calibration_rows` documents,
    embedded by the job's own replicas (a graph run before the main pass; `pipelines.embed.calibration`)."""
    from pipelines.embed.graph import build_calibration_graph
    from pipelines.ray_runtime import stream_rows

    items = sample_items(plan.items, cfg.output.calibration_rows)
    rows = stream_rows(lambda: build_calibration_graph(cfg, items, fingerprint, tokenizer), cfg.run)
    return sample_ranges(rows, items, needed, cfg.output.calibration_rows)


def _tokenizer_args(cfg: EmbedJobConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The graph module and the tokenize stage's arguments (the tokenizer spec: cached, or built with
    transformers on a model's first job, 2-4 s), prefetched while Ray starts."""
    from pipelines.embed.graph import tokenizer_args

    return tokenizer_args(cfg, fingerprint)


EMBED = EmbedJob()


def run_embed(cfg: EmbedJobConfig, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) one embedding job; returns its summary."""
    return EMBED.run(cfg, dry_run=dry_run, stream=stream)
