"""What composes an embedrank job: rooms by job on top of an input room and an output room.

    input/    planning work items, reading them        output/   root, records, commit protocol, lock, reader, …
    embed/    rerank/    reindex/                      one package per job: its config, stages and spec
    lifecycle (the one job lifecycle), graph (the one place that builds Ray Data graphs), stages (column
    declarations), ray_runtime (start/join Ray, run work on it), ray_quiet (Ray's output off the terminal),
    driver_session (stop on signals), cluster_view (what the Ray offers and waits for), resources (compute fitted
    to that view), watchdog, config (shared bases), fingerprint, preflight, storage, cli

Nothing here imports torch or transformers; model code lives in `actors`.
"""

__version__ = "0.1.0"
