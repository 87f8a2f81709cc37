"""The rerank graphs: scoring (candidate items → read (→ join documents → regroup by item) → score → write
pieces) and ranking (committed scores → bucket by query → rank each bucket whole → write it)."""

from __future__ import annotations

from typing import Any

from actors.replicas import RerankReplica
from common.columns import (
    BUCKET,
    DOC_ID,
    ITEM,
    N_TOKENS,
    QUERY,
    QUERY_ID,
    REPLICA_STARTUP,
    ROW,
    SCORE,
    TEXT,
    TRUNCATED,
)
from pipelines import graph
from pipelines.input.plan import WorkItem
from pipelines.input.reading import read_items, row_columns
from pipelines.output.lock import held_epoch
from pipelines.output.pieces import SCORES_DIR
from pipelines.rerank.config import RerankJobConfig
from pipelines.rerank.joining import order_joined_item, read_documents
from pipelines.rerank.ranking import rank_bucket, read_score_files
from pipelines.stages import Stage
from pipelines.storage import Storage

SCORE_OUTPUT = [QUERY_ID, DOC_ID, SCORE, N_TOKENS, TRUNCATED, ITEM, ROW]

# declared here because `actors/` never imports `pipelines/`
SCORE_REPLICA = Stage(RerankReplica, needs=(QUERY_ID, QUERY, TEXT),
                      adds=(SCORE, N_TOKENS, TRUNCATED, REPLICA_STARTUP), drops=(QUERY, TEXT))


def build_score_graph(cfg: RerankJobConfig, items: list[WorkItem], doc_items: list[WorkItem], storage: Storage,
                      fingerprint: dict[str, Any]):
    """rerank, phase 1: candidate items → read (→ join documents → regroup by item) → score → write pieces."""
    c = cfg.compute
    flow = graph.per_item(graph.item_source(items), read_items.stage.adding(*row_columns(cfg.input)), c.io_num_cpus,
                          cfg=cfg.input)
    if cfg.documents is not None:
        docs = graph.per_item(graph.item_source(doc_items), read_documents.stage, c.io_num_cpus, cfg=cfg.documents)
        flow = flow.join(docs, on=DOC_ID, join_type="left_outer", num_partitions=cfg.documents.join_partitions)
        flow = flow.map_groups(ITEM, order_joined_item.stage, batch_format="pyarrow", num_cpus=c.io_num_cpus)
    flow = flow.map_batches(SCORE_REPLICA,
                            fn_constructor_kwargs={"settings": cfg.replica_settings(fingerprint.get("model_digest"))},
                            **graph.model_pool(c))
    return graph.write(flow, c.io_num_cpus, storage=storage, fingerprint=fingerprint, output_columns=SCORE_OUTPUT,
                       data_dir=SCORES_DIR, reject_id_columns=(QUERY_ID, DOC_ID),
                       target_file_bytes=cfg.output.target_file_mb * 2**20)


def build_rank_graph(score_files: list[str], storage: Storage, fingerprint: dict[str, Any], buckets: int,
                     skip_buckets: list[int], top_k: int | None, io_num_cpus: float, item_order: dict[str, int]):
    """rerank, phase 2: committed scores → bucket by query → rank each bucket whole → write it.

    `item_order` (item id → position in the plan) decides which of duplicate pairs is kept: the first by file."""
    flow = graph.per_item(graph.path_source(score_files), read_score_files.stage, io_num_cpus, storage=storage,
                          buckets=buckets, skip_buckets=skip_buckets)
    return flow.map_groups(BUCKET, rank_bucket.stage, batch_format="pyarrow", num_cpus=io_num_cpus,
                           fn_kwargs={"storage": storage, "fingerprint": fingerprint, "top_k": top_k,
                                      "item_order": item_order, "epoch": held_epoch(storage)}).ds
