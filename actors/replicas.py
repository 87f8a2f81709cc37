"""The replica classes that the Ray graph names: torch-free shells around the model replicas.

The driver only names a replica class (Ray pickles it and builds it in each replica process), yet importing
`actors.embedder` or `actors.reranker` imports torch and transformers: about 4.5 CPU-seconds and 400 MiB in
every job process, for a driver that never runs a model. Each shell imports its model module in its
constructor, in the replica's process, where the replica's start-up report times that import
(`actors.startup`). The shells keep the model classes' names, so Ray Data's operator names stay
`MapBatches(EmbedReplica)` and `MapBatches(RerankReplica)`.
"""

from __future__ import annotations

from typing import Any


class EmbedReplica:
    """`actors.embedder.EmbedReplica`, loaded in the replica's process."""

    def __init__(self, settings: Any):
        from actors.embedder import EmbedReplica as Model

        self.model = Model(settings)

    def __call__(self, table: Any) -> Any:
        return self.model(table)


class RerankReplica:
    """`actors.reranker.RerankReplica`, loaded in the replica's process."""

    def __init__(self, settings: Any):
        from actors.reranker import RerankReplica as Model

        self.model = Model(settings)

    def __call__(self, table: Any) -> Any:
        return self.model(table)
