"""The embedding graph: planned items → read + tokenize (CPU tasks, one item each) → embed (actor pool of
model replicas, autoscaled min..max) → write pieces (CPU tasks). The driver commits the piece records."""

from __future__ import annotations

import dataclasses
from typing import Any

from actors.replicas import EmbedReplica
from actors.tokenize import spec_digest, tokenizer_spec
from common.columns import (
    EMBEDDING,
    ID,
    INPUT_IDS,
    N_TOKENS,
    PADDED,
    REPLICA_STARTUP,
    TRUNCATED,
)
from common.model_cache import resolve_model_path
from pipelines import graph
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.stages import read_and_tokenize
from pipelines.input.plan import WorkItem
from pipelines.stages import Stage
from pipelines.storage import Storage

OUTPUT_BASE = [ID, EMBEDDING, N_TOKENS, TRUNCATED]
"""The columns of a default embedding output file, before pass-through columns (`output_base`)."""

# declared here because `actors/` never imports `pipelines/`; it adds the configured vector columns too
EMBED_REPLICA = Stage(EmbedReplica, needs=(INPUT_IDS,), adds=(PADDED, REPLICA_STARTUP), drops=(INPUT_IDS,))


def output_base(cfg: EmbedJobConfig) -> list[str]:
    """The columns of every embedding output file, before pass-through columns: id, the vector columns (one
    `embedding`, or `output.vectors`), n_tokens, truncated."""
    return [ID, *cfg.output.vector_column_names(), N_TOKENS, TRUNCATED]


def tokenizer_args(cfg: EmbedJobConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The tokenize stage's arguments: the tokenizer as transformers configures it, serialised (and cached by
    content: `actors.tokenizer_cache`), so that CPU tasks rebuild it without torch. A URL model's tokenizer files
    come through the node's cache."""
    m = cfg.model
    path = resolve_model_path(m.path, cfg.model_storage_options, weights=False,
                              expected_digest=fingerprint.get("model_digest"))
    spec = tokenizer_spec(path, m.revision)
    return {"spec": spec, "digest": spec_digest(spec), "max_length": m.max_length, "instruction": m.instruction}


def build_embed_graph(cfg: EmbedJobConfig, items: list[WorkItem], storage: Storage, fingerprint: dict[str, Any],
                      tokenizer: dict[str, Any] | None = None):
    """`tokenizer`: `tokenizer_args`, when the caller has them already (the job prefetches them)."""
    tokenizer = tokenizer if tokenizer is not None else tokenizer_args(cfg, fingerprint)
    flow = graph.per_item(graph.item_source(items), read_and_tokenize.stage.adding(*cfg.input.extra_columns),
                          cfg.compute.io_num_cpus, cfg=cfg.input, tokenizer=tokenizer)
    return embed_and_write(flow, cfg, storage, fingerprint, output_base(cfg) + list(cfg.input.passthrough_columns))


def embed_and_write(flow: graph.Flow, cfg: EmbedJobConfig, storage: Storage, fingerprint: dict[str, Any],
                    output_columns: list[str]):
    """The model pool, then the write: what the embed and reindex graphs end with."""
    flow = flow.map_batches(EMBED_REPLICA.adding(*cfg.output.vector_column_names()),
                            fn_constructor_kwargs={"settings": cfg.replica_settings(fingerprint.get("model_digest"))},
                            **graph.model_pool(cfg.compute))
    return graph.write(flow, cfg.compute.io_num_cpus, storage=storage, fingerprint=fingerprint,
                       output_columns=output_columns, partition_by=cfg.output.partition_by,
                       target_file_bytes=cfg.output.target_file_mb * 2**20)


def build_calibration_graph(cfg: EmbedJobConfig, items: list[WorkItem], fingerprint: dict[str, Any],
                            tokenizer: dict[str, Any]):
    """int8/uint8 calibration (`pipelines.embed.calibration`): the rows of `items` with their float32 pooled
    vector as `embedding` (the same replicas and settings as the job's pass, before any column is cut)."""
    flow = graph.per_item(graph.item_source(items), read_and_tokenize.stage.adding(*cfg.input.extra_columns),
                          cfg.compute.io_num_cpus, cfg=cfg.input, tokenizer=tokenizer)
    settings = dataclasses.replace(cfg.replica_settings(fingerprint.get("model_digest")), vectors=None,
                                   vector_dtype="float32")
    return flow.map_batches(EMBED_REPLICA.adding(EMBEDDING), fn_constructor_kwargs={"settings": settings},
                            **graph.model_pool(cfg.compute)).ds
