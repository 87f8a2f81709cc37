"""The one place that builds Ray Data graphs.

embed: planned items → read + tokenize (CPU tasks, one work item each) → embed
(actor pool of model replicas, autoscaled min..max) → write pieces (CPU tasks).
The driver consumes the piece records and commits (see `pipelines.output.root`).

Reading and tokenising are one stage on purpose: Ray Data would fuse them anyway,
and a fused stage takes the larger batch size, which bundles many items into one
task so that nothing could commit until the whole corpus was through.
"""

from __future__ import annotations

import json
from typing import Any

from actors.embedder import EmbedReplica
from actors.loading import resolve_model_path
from actors.reranker import RerankReplica
from actors.tokenize import spec_digest, tokenizer_spec
from pipelines.config import ComputeConfig, EmbedJobConfig, InputConfig, RerankJobConfig
from pipelines.rerank.joining import order_joined_item, read_documents
from common.model_cache import is_model_url
from pipelines.input.plan import WorkItem
from pipelines.rerank.ranking import rank_bucket, read_score_files
from pipelines.input.reading import read_items
from pipelines.reindex.stages import (carry_or_tokenize, count_changes, read_base_keys, read_base_vectors,
                                  read_hash_and_tokenize, read_snapshot_keys, read_with_hash)
from pipelines.storage import Storage
from pipelines.embed.stages import read_and_tokenize
from pipelines.output.pieces import SCORES_DIR, write_pieces

EMBED_OUTPUT_BASE = ["id", "embedding", "n_tokens", "truncated"]
SCORE_OUTPUT = ["query_id", "doc_id", "score", "n_tokens", "truncated", "_item", "_row"]


def _items(items: list[WorkItem]):
    import ray.data

    return ray.data.from_items([{"item": json.dumps(i.to_dict())} for i in items], override_num_blocks=len(items))


def _paths(paths: list[str]):
    import ray.data

    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, min(len(paths), 256)))


def _model_pool(compute: ComputeConfig) -> dict[str, Any]:
    import ray.data

    return {"compute": ray.data.ActorPoolStrategy(min_size=compute.min_replicas, max_size=compute.max_replicas),
            "batch_size": compute.batch_rows, "batch_format": "pyarrow", "num_gpus": compute.num_gpus or None,
            "num_cpus": compute.num_cpus,
            **({"accelerator_type": compute.accelerator_type} if compute.accelerator_type else {})}


def _model_source(cfg: EmbedJobConfig | RerankJobConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """For a model in object storage: the options to fetch it with and the listing digest it must still have."""
    if not is_model_url(cfg.model.path):
        return {}
    return {"storage_options": cfg.model_storage_options, "model_digest": fingerprint.get("model_digest")}


def _tokenizer(cfg: EmbedJobConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The tokenize stage's arguments: the tokenizer, loaded here once with transformers and serialised, so
    that CPU tasks rebuild it without torch. A URL model's tokenizer files come through the node's cache."""
    m = cfg.model
    path, source = m.path, _model_source(cfg, fingerprint)
    if source:
        path = resolve_model_path(m.path, source["storage_options"], weights=False,
                                  expected_digest=source["model_digest"])
    spec = tokenizer_spec(path, m.revision)
    return {"spec": spec, "digest": spec_digest(spec), "max_length": m.max_length, "instruction": m.instruction}


def build_embed_graph(cfg: EmbedJobConfig, items: list[WorkItem], storage: Storage,
                      fingerprint: dict[str, Any]):
    ds = _items(items).map_batches(read_and_tokenize, batch_size=1, batch_format="pyarrow",
                                   num_cpus=cfg.compute.io_num_cpus,
                                   fn_kwargs={"cfg": cfg.input, "tokenizer": _tokenizer(cfg, fingerprint)})
    return _embed_and_write(ds, cfg, storage, fingerprint, EMBED_OUTPUT_BASE + list(cfg.input.passthrough_columns))


def _embed_and_write(ds, cfg: EmbedJobConfig, storage: Storage, fingerprint: dict[str, Any],
                     output_columns: list[str]):
    m, c = cfg.model, cfg.compute
    ds = ds.map_batches(
        EmbedReplica,
        fn_constructor_kwargs={"path": m.path, "revision": m.revision, "dtype": m.dtype, "num_gpus": c.num_gpus,
                               "num_cpus": c.num_cpus, "dimensions": m.dimensions,
                               "max_batch_tokens": m.max_batch_tokens, "vector_dtype": cfg.output.vector_dtype,
                               "batch_overhead_tokens": m.batch_overhead_tokens,
                               **_model_source(cfg, fingerprint)},
        **_model_pool(c),
    )
    return ds.map_batches(write_pieces, batch_format="pyarrow", batch_size=None, num_cpus=c.io_num_cpus,
                          fn_kwargs={"storage": storage, "fingerprint": fingerprint,
                                     "output_columns": output_columns, "partition_by": cfg.output.partition_by})


def build_diff_graph(source: InputConfig, items: list[WorkItem], fingerprint_id: str, base_files: list[str],
                     index_storage: Storage, partitions: int, io_num_cpus: float):
    """reindex, phase 1: snapshot rows ⟗ the current version's rows on id → counts of new, changed, unchanged,
    deleted and rejected documents (one small row per block; the driver sums them)."""
    ds = _items(items).map_batches(read_snapshot_keys, batch_size=1, batch_format="pyarrow", num_cpus=io_num_cpus,
                                   fn_kwargs={"cfg": source, "fingerprint_id": fingerprint_id}) if items else None
    base = _paths(base_files).map_batches(read_base_keys, batch_size=1, batch_format="pyarrow",
                                          num_cpus=io_num_cpus, fn_kwargs={"storage": index_storage}) \
        if base_files else None
    if ds is not None and base is not None:
        ds = ds.join(base, join_type="full_outer", num_partitions=partitions, on=("id",))
    return (ds if ds is not None else base).map_batches(count_changes, batch_size=None, batch_format="pyarrow",
                                                        num_cpus=io_num_cpus)


def build_reindex_graph(cfg: EmbedJobConfig, items: list[WorkItem], storage: Storage, fingerprint: dict[str, Any],
                        fingerprint_id: str, base_files: list[str], index_storage: Storage, partitions: int):
    """reindex, phase 2: snapshot items ⟕ the current version's vectors on id → per item, unchanged documents
    carry their vector, the rest are tokenised and embedded → write pieces (with `content_hash`)."""
    c = cfg.compute
    tokenizer = _tokenizer(cfg, fingerprint)
    output_columns = EMBED_OUTPUT_BASE + ["content_hash"] + list(cfg.input.passthrough_columns)
    if not base_files:
        ds = _items(items).map_batches(read_hash_and_tokenize, batch_size=1, batch_format="pyarrow",
                                       num_cpus=c.io_num_cpus,
                                       fn_kwargs={"cfg": cfg.input, "fingerprint_id": fingerprint_id,
                                                  "tokenizer": tokenizer})
        return _embed_and_write(ds, cfg, storage, fingerprint, output_columns)
    ds = _items(items).map_batches(read_with_hash, batch_size=1, batch_format="pyarrow", num_cpus=c.io_num_cpus,
                                   fn_kwargs={"cfg": cfg.input, "fingerprint_id": fingerprint_id})
    base = _paths(base_files).map_batches(read_base_vectors, batch_size=1, batch_format="pyarrow",
                                          num_cpus=c.io_num_cpus, fn_kwargs={"storage": index_storage})
    ds = ds.join(base, join_type="left_outer", num_partitions=partitions, on=("id",))
    ds = ds.groupby("_item", num_partitions=partitions).map_groups(carry_or_tokenize, batch_format="pyarrow", num_cpus=c.io_num_cpus,
                                        fn_kwargs={"tokenizer": tokenizer})
    return _embed_and_write(ds, cfg, storage, fingerprint, output_columns)


def build_score_graph(cfg: RerankJobConfig, items: list[WorkItem], doc_items: list[WorkItem], storage: Storage,
                      fingerprint: dict[str, Any]):
    """rerank, phase 1: candidate items → read (→ join documents → regroup by item) → score → write pieces."""
    m, c = cfg.model, cfg.compute
    ds = _items(items).map_batches(read_items, fn_kwargs={"cfg": cfg.input}, batch_size=1,
                                   batch_format="pyarrow", num_cpus=c.io_num_cpus)
    if cfg.documents is not None:
        docs = _items(doc_items).map_batches(read_documents, fn_kwargs={"cfg": cfg.documents}, batch_size=1,
                                             batch_format="pyarrow", num_cpus=c.io_num_cpus)
        ds = ds.join(docs, join_type="left_outer", num_partitions=cfg.documents.join_partitions, on=("doc_id",))
        ds = ds.groupby("_item").map_groups(order_joined_item, batch_format="pyarrow", num_cpus=c.io_num_cpus)
    ds = ds.map_batches(
        RerankReplica,
        fn_constructor_kwargs={"path": m.path, "revision": m.revision, "dtype": m.dtype, "num_gpus": c.num_gpus,
                               "num_cpus": c.num_cpus, "instruction": m.instruction, "max_length": m.max_length,
                               "max_batch_tokens": m.max_batch_tokens, "share_prefix": m.share_prefix,
                               "batch_overhead_tokens": m.batch_overhead_tokens,
                               **_model_source(cfg, fingerprint)},
        **_model_pool(c),
    )
    return ds.map_batches(write_pieces, batch_format="pyarrow", batch_size=None, num_cpus=c.io_num_cpus,
                          fn_kwargs={"storage": storage, "fingerprint": fingerprint, "output_columns": SCORE_OUTPUT,
                                     "data_dir": SCORES_DIR, "reject_id_columns": ("query_id", "doc_id")})


def build_rank_graph(score_files: list[str], storage: Storage, fingerprint: dict[str, Any], buckets: int,
                     skip_buckets: list[int], top_k: int | None, io_num_cpus: float):
    """rerank, phase 2: committed scores → bucket by query → rank each bucket whole → write it."""
    import ray.data

    files = ray.data.from_items([{"path": p} for p in score_files], override_num_blocks=min(len(score_files), 256))
    ds = files.map_batches(read_score_files, batch_size=1, batch_format="pyarrow", num_cpus=io_num_cpus,
                           fn_kwargs={"storage": storage, "buckets": buckets, "skip_buckets": skip_buckets})
    return ds.groupby("_bucket").map_groups(rank_bucket, batch_format="pyarrow", num_cpus=io_num_cpus,
                                            fn_kwargs={"storage": storage, "fingerprint": fingerprint,
                                                       "top_k": top_k})
