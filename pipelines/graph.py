"""The one module that wires Ray Data graphs: sources, stages, actor pools, joins, groups, the write.

Each job's graph (`pipelines/<job>/graph.py`) is composed from these; no other module builds a Ray Data
operator. Every stage is wired through its column declaration (`pipelines.stages.Stage`): a batch that lacks
a column its stage needs fails naming both, and `Flow` checks as a graph is built that what each stage needs is
added upstream (a wiring mistake fails here, before any work starts).

One work item per read task (`batch_size=1`) on purpose: Ray Data fuses a read stage with the CPU stage after
it, and a fused stage takes the larger batch size, which would bundle many items into one task so that
nothing could commit until the whole corpus was through.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from common.columns import ITEM_JSON, PATH
from pipelines.config import ComputeConfig
from pipelines.input.plan import WorkItem
from pipelines.output.lock import held_epoch
from pipelines.output.pieces import write_pieces
from pipelines.stages import Stage


@dataclasses.dataclass(frozen=True)
class Flow:
    """A Ray Data dataset being built and the columns its declared stages leave it: wiring a stage where its
    needs are not met fails as the graph is built (`Stage.columns_after`), not in a task hours into a run."""

    ds: Any
    columns: frozenset[str]

    def map_batches(self, stage: Stage, **options: Any) -> Flow:
        return Flow(self.ds.map_batches(stage.task(), **options), stage.columns_after(self.columns))

    def map_groups(self, key: str, stage: Stage, num_partitions: int | None = None, **options: Any) -> Flow:
        """`stage` applied to all rows of each `key` value at once."""
        if key not in self.columns:
            raise AssertionError(f"{stage.name} groups by {key!r}, which no stage upstream adds")
        groups = self.ds.groupby(key, num_partitions=num_partitions)
        return Flow(groups.map_groups(stage.task(), **options), stage.columns_after(self.columns))

    def join(self, other: Flow, on: str, join_type: str, num_partitions: int) -> Flow:
        shared = (self.columns & other.columns) - {on}
        if on not in self.columns or on not in other.columns or shared:
            raise AssertionError(f"join on {on!r}: both sides must have it and share no other column "
                                 f"(left: {sorted(self.columns)}, right: {sorted(other.columns)})")
        return Flow(self.ds.join(other.ds, join_type=join_type, num_partitions=num_partitions, on=(on,)),
                     self.columns | other.columns)


def source(column: str, values: list[str], blocks: int) -> Flow:
    """Where a graph starts: one string column, `values` in `blocks` blocks."""
    import ray.data

    return Flow(ray.data.from_items([{column: v} for v in values], override_num_blocks=blocks), frozenset({column}))


def item_source(items: list[WorkItem]) -> Flow:
    return source(ITEM_JSON, [json.dumps(i.to_dict()) for i in items], len(items))


def path_source(paths: list[str]) -> Flow:
    return source(PATH, paths, max(1, min(len(paths), 256)))


def per_item(flow: Flow, stage: Stage, num_cpus: float, **fn_kwargs: Any) -> Flow:
    """A CPU stage given one planned item (or one file) per task (`batch_size=1`): see the module's docstring."""
    return flow.map_batches(stage, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus, fn_kwargs=fn_kwargs)


def model_pool(compute: ComputeConfig) -> dict[str, Any]:
    """The `map_batches` options of the model actor pool, from a compute section fitted to the cluster."""
    import ray.data

    if compute.auto_fields:
        raise AssertionError(f"compute {compute.auto_fields} still 'auto': the lifecycle fits them to the cluster "
                             "(pipelines.resources.fit_compute) before a graph is built")
    return {"compute": ray.data.ActorPoolStrategy(min_size=compute.min_replicas, max_size=compute.max_replicas),
            "batch_size": compute.batch_rows, "batch_format": "pyarrow", "num_gpus": compute.num_gpus or None,
            "num_cpus": compute.num_cpus,
            **({"accelerator_type": compute.accelerator_type} if compute.accelerator_type else {})}


def write(flow: Flow, io_num_cpus: float, **fn_kwargs: Any):
    """The last stage of an item graph: each block's rows written as pieces, named as of the lease this driver holds
    on the output; returns the dataset of piece records."""
    stage = write_pieces.stage.needing(*fn_kwargs["output_columns"])
    fn_kwargs = {"epoch": held_epoch(fn_kwargs.get("storage")), **fn_kwargs}
    return flow.map_batches(stage, batch_format="pyarrow", batch_size=None, num_cpus=io_num_cpus,
                            fn_kwargs=fn_kwargs).ds


def verify_graph(column: str, files: list[str], check: Stage, key: str, group: Stage, num_partitions: int,
                 num_cpus: float, **fn_kwargs: Any):
    """`embedrank verify` as a Ray Data job: one task per named file (`check`, given `fn_kwargs`) emits its result
    and its row keys, which are grouped on `key` (their hash bucket; a hash shuffle into `num_partitions`) and
    checked a bucket at a time (`group`); returns the dataset of what reaches the driver."""
    flow = per_item(source(column, files, max(1, min(len(files), 256))), check, num_cpus, **fn_kwargs)
    return flow.map_groups(key, group, num_partitions=num_partitions, batch_format="pyarrow", num_cpus=num_cpus).ds


def read_parquet_files(paths: list[str], filesystem: Any):
    """A Ray Dataset over exactly these Parquet files (full paths on `filesystem`, a `pyarrow.fs.FileSystem`);
    no Hive partitions are inferred from the paths (a partition column is in the files)."""
    import pyarrow as pa
    import ray.data

    if not paths:
        return ray.data.from_arrow(pa.table({}))
    return ray.data.read_parquet(paths, filesystem=filesystem, partitioning=None, file_extensions=None)
