"""The reindex graphs: the diff (snapshot ⟗ current version on id → change counts) and the build (snapshot ⟕
current vectors on id → unchanged documents carry their vector, the rest are embedded → write pieces)."""

from __future__ import annotations

from typing import Any

from common.columns import CONTENT_HASH, ID, ITEM
from pipelines import graph
from pipelines.embed.config import EmbedJobConfig, InputConfig
from pipelines.embed import graph as embed_graph
from pipelines.input.plan import WorkItem
from pipelines.input.reading import row_columns
from pipelines.reindex.stages import (carry_or_tokenize, count_changes, read_base_keys, read_base_vectors,
                                      read_hash_and_tokenize, read_snapshot_keys, read_with_hash)
from pipelines.storage import Storage


def build_diff_graph(source: InputConfig, items: list[WorkItem], fingerprint_id: str, base_files: list[str],
                     index_storage: Storage, partitions: int, io_num_cpus: float):
    """reindex, phase 1: snapshot rows ⟗ the current version's rows on id → counts of new, changed, unchanged,
    deleted and rejected documents (one small row per block; the driver sums them)."""
    snapshot = base = None
    if items:
        snapshot = graph.per_item(graph.item_source(items), read_snapshot_keys.stage, io_num_cpus, cfg=source,
                                  fingerprint_id=fingerprint_id)
    if base_files:
        base = graph.per_item(graph.path_source(base_files), read_base_keys.stage, io_num_cpus,
                              storage=index_storage)
    if snapshot is not None and base is not None:
        flow = snapshot.join(base, on=ID, join_type="full_outer", num_partitions=partitions)
    else:
        flow = snapshot if snapshot is not None else base
    return flow.map_batches(count_changes.stage, batch_size=None, batch_format="pyarrow", num_cpus=io_num_cpus).ds


def build_reindex_graph(cfg: EmbedJobConfig, items: list[WorkItem], storage: Storage, fingerprint: dict[str, Any],
                        fingerprint_id: str, base_files: list[str], index_storage: Storage, partitions: int):
    """reindex, phase 2: snapshot items ⟕ the current version's vectors on id → per item, unchanged documents
    carry their vector, the rest are tokenised and embedded → write pieces (with `content_hash`)."""
    io_num_cpus = cfg.compute.io_num_cpus
    tokenizer = embed_graph.tokenizer_args(cfg, fingerprint)
    output_columns = embed_graph.OUTPUT_BASE + [CONTENT_HASH] + list(cfg.input.passthrough_columns)
    if not base_files:
        stage = read_hash_and_tokenize.stage.adding(*cfg.input.extra_columns)
        flow = graph.per_item(graph.item_source(items), stage, io_num_cpus, cfg=cfg.input,
                              fingerprint_id=fingerprint_id, tokenizer=tokenizer)
        return embed_graph.embed_and_write(flow, cfg, storage, fingerprint, output_columns)
    snapshot = graph.per_item(graph.item_source(items), read_with_hash.stage.adding(*row_columns(cfg.input)),
                              io_num_cpus, cfg=cfg.input, fingerprint_id=fingerprint_id)
    base = graph.per_item(graph.path_source(base_files), read_base_vectors.stage, io_num_cpus, storage=index_storage)
    flow = snapshot.join(base, on=ID, join_type="left_outer", num_partitions=partitions)
    flow = flow.map_groups(ITEM, carry_or_tokenize.stage, num_partitions=partitions, batch_format="pyarrow",
                           num_cpus=io_num_cpus, fn_kwargs={"tokenizer": tokenizer})
    return embed_graph.embed_and_write(flow, cfg, storage, fingerprint, output_columns)
