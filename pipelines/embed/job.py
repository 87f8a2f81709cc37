"""The embedding backfill job: every input row embedded into committed Parquet exactly once."""

from __future__ import annotations

from typing import Any, TextIO

from pipelines import __version__
from pipelines.embed.config import EmbedJobConfig
from pipelines.fingerprint import model_identity
from pipelines.input.plan import Plan
from pipelines.lifecycle import JobSpec, Work
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
        "embedrank_version": __version__,
    }


class EmbedJob(JobSpec):
    name = "embed"
    config_type = EmbedJobConfig

    def preflight(self, cfg: EmbedJobConfig) -> None:
        preflight_model(cfg.model.path, cfg.model.dimensions, cfg.model_storage_options, cfg.model.revision)

    def lock_storage(self, cfg: EmbedJobConfig) -> Storage:
        return Storage(cfg.output.path, cfg.output_storage_options)

    def prepare(self, cfg: EmbedJobConfig, plan: Plan, stream: TextIO) -> Work:
        from pipelines.embed.graph import build_embed_graph

        root = OutputRoot(self.lock_storage(cfg))
        fingerprint = embed_fingerprint(cfg)
        return Work(root=root, source=cfg.input, fingerprint=fingerprint,
                    build_graph=lambda items: build_embed_graph(cfg, items, root.storage, fingerprint))


EMBED = EmbedJob()


def run_embed(cfg: EmbedJobConfig, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) one embedding job; returns its summary."""
    return EMBED.run(cfg, dry_run=dry_run, stream=stream)
