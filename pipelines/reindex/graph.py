"""The reindex graphs, none with a shuffle: item digests (one task per item), the diff (one task per input file:
its items ⟗ the current version's rows of that file) and the build (one task per item: its rows, unchanged
documents carrying their vector from the base files named for it, the rest embedded → write pieces)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from common.columns import CARRY_PREFIX, CONTENT_HASH, TASK_JSON
from pipelines import graph
from pipelines.embed import graph as embed_graph
from pipelines.embed.config import EmbedJobConfig, InputConfig
from pipelines.input.plan import WorkItem
from pipelines.reindex.stages import (
    carry_locally,
    diff_file,
    digest_items,
    read_hash_and_tokenize,
)
from pipelines.storage import Storage


def build_digest_graph(source: InputConfig, items: list[WorkItem], fingerprint_id: str, io_num_cpus: float):
    """reindex, phase 1: per planned item, its content digest (`pipelines.reindex.stages.item_digest`)."""
    return graph.per_item(graph.item_source(items), digest_items.stage, io_num_cpus, cfg=source,
                          fingerprint_id=fingerprint_id).ds


def build_diff_graph(source: InputConfig, tasks: list[dict[str, Any]], fingerprint_id: str, index_storage: Storage,
                     io_num_cpus: float):
    """reindex, phase 2: per input file, its rebuilt items ⟗ the current version's rows of that file on id, in one
    task (`diff_file`): counts, and the documents neither side matched, for the driver to pair up."""
    flow = graph.source(TASK_JSON, [json.dumps(t) for t in tasks], len(tasks))
    return graph.per_item(flow, diff_file.stage, io_num_cpus, cfg=source, fingerprint_id=fingerprint_id,
                          storage=index_storage).ds


def build_reindex_graph(cfg: EmbedJobConfig, items: list[WorkItem], storage: Storage, fingerprint: dict[str, Any],
                        fingerprint_id: str, carry_from: dict[str, list[str]] | None, index_storage: Storage,
                        vector_types: dict[str, pa.DataType] | None):
    """reindex, phase 3: per item, unchanged documents carry their vector from the base files `carry_from` names
    for the item (None: nothing to carry from, every row is embedded), the rest are tokenised and embedded →
    write pieces (with `content_hash`)."""
    io_num_cpus = cfg.compute.io_num_cpus
    tokenizer = embed_graph.tokenizer_args(cfg, fingerprint)
    output_columns = embed_graph.output_base(cfg) + [CONTENT_HASH] + list(cfg.input.passthrough_columns)
    if carry_from is None or not vector_types:
        stage = read_hash_and_tokenize.stage.adding(*cfg.input.extra_columns)
        flow = graph.per_item(graph.item_source(items), stage, io_num_cpus, cfg=cfg.input,
                              fingerprint_id=fingerprint_id, tokenizer=tokenizer)
        return embed_graph.embed_and_write(flow, cfg, storage, fingerprint, output_columns)
    tasks = [json.dumps({"item": i.to_dict(), "base_files": carry_from.get(i.item_id, [])}) for i in items]
    flow = graph.per_item(graph.source(TASK_JSON, tasks, len(tasks)),
                          carry_locally.stage.adding(*cfg.input.extra_columns, *(CARRY_PREFIX + c for c in vector_types)),
                          io_num_cpus, cfg=cfg.input,
                          fingerprint_id=fingerprint_id, storage=index_storage, vector_types=vector_types,
                          tokenizer=tokenizer)
    return embed_graph.embed_and_write(flow, cfg, storage, fingerprint, output_columns)
