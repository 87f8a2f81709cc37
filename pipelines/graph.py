"""The one place that builds Ray Data graphs.

embed: planned items → read + tokenize (CPU tasks, one work item each) → embed
(actor pool of model replicas, autoscaled min..max) → write pieces (CPU tasks).
The driver consumes the piece records and commits (see `pipelines.commit`).

Reading and tokenising are one stage on purpose: Ray Data would fuse them anyway,
and a fused stage takes the larger batch size, which bundles many items into one
task so that nothing could commit until the whole corpus was through.
"""

from __future__ import annotations

import json
from typing import Any

from actors.embedder import EmbedReplica
from actors.tokenize import tokenize_batch
from pipelines.config import EmbedJobConfig
from pipelines.plan import WorkItem
from pipelines.reading import read_items
from pipelines.storage import Storage
from pipelines.writing import write_pieces

EMBED_OUTPUT_BASE = ["id", "embedding", "n_tokens", "truncated"]


def read_and_tokenize(batch, cfg, tokenizer: dict[str, Any]):
    """One planned item in, its rows out with token ids (rejected rows carry none)."""
    return tokenize_batch(read_items(batch, cfg), **tokenizer)


def build_embed_graph(cfg: EmbedJobConfig, items: list[WorkItem], storage: Storage,
                      fingerprint: dict[str, Any]):
    import ray.data

    m, c = cfg.model, cfg.compute
    ds = ray.data.from_items([{"item": json.dumps(i.to_dict())} for i in items],
                             override_num_blocks=len(items))
    ds = ds.map_batches(read_and_tokenize, batch_size=1, batch_format="pyarrow", num_cpus=c.io_num_cpus,
                        fn_kwargs={"cfg": cfg.input, "tokenizer": {"path": m.path, "revision": m.revision,
                                                                   "max_length": m.max_length,
                                                                   "instruction": m.instruction}})
    ds = ds.map_batches(
        EmbedReplica,
        fn_constructor_kwargs={"path": m.path, "revision": m.revision, "dtype": m.dtype, "num_gpus": c.num_gpus,
                               "num_cpus": c.num_cpus, "dimensions": m.dimensions,
                               "max_batch_tokens": m.max_batch_tokens, "vector_dtype": cfg.output.vector_dtype},
        compute=ray.data.ActorPoolStrategy(min_size=c.min_replicas, max_size=c.max_replicas),
        batch_size=c.batch_rows, batch_format="pyarrow", num_gpus=c.num_gpus or None, num_cpus=c.num_cpus,
    )
    output_columns = EMBED_OUTPUT_BASE + list(cfg.input.passthrough_columns)
    return ds.map_batches(write_pieces, batch_format="pyarrow", batch_size=None, num_cpus=c.io_num_cpus,
                          fn_kwargs={"storage": storage, "fingerprint": fingerprint,
                                     "output_columns": output_columns})
