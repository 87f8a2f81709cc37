"""A stage that hangs fails the job within the stall timeout, naming the stage, and its actors are stopped."""

import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import job_process_env

from pipelines.config import load_config
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import read_committed
from pipelines.output.verify import verify_output
from pipelines.watchdog import PipelineStalled, iter_batches_watched

pytestmark = pytest.mark.integration


def pool_actor_states():
    import ray

    table = ray._private.state.state.actor_table(None)
    return [a["State"] for a in table.values() if a["ActorClassName"].startswith("MapWorker(MapBatches(Hanger))")]


def test_a_hung_actor_is_named_and_killed(ray_local):
    import ray.data

    class Hanger:
        """A pool actor that hangs on the batch holding 3 (defined here so that Ray pickles it by value)."""

        def __call__(self, batch):
            if 3 in batch["i"].to_pylist():
                time.sleep(10**6)
            return batch

    ds = (ray.data.from_items([{"i": i} for i in range(6)], override_num_blocks=6)
          .map_batches(lambda b: b, batch_size=1, batch_format="pyarrow", num_cpus=0.25)
          .map_batches(Hanger, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), batch_size=1,
                       batch_format="pyarrow", num_cpus=0.5))
    seen = []
    with pytest.raises(PipelineStalled, match=r"stuck stage: MapBatches\(Hanger\) \(\d task\(s\) running") as err:
        for batch in iter_batches_watched(ds, stall_timeout_s=4, startup_timeout_s=120, batch_format="pyarrow",
                                          batch_size=None):
            seen += batch["i"].to_pylist()
    assert err.value.stage == "MapBatches(Hanger)" and 3 not in seen
    deadline = time.monotonic() + 20
    while "ALIVE" in pool_actor_states() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool_actor_states() and "ALIVE" not in pool_actor_states()


CONFIG = """
input: {{paths: ["{corpus}/*.parquet"], id_column: doc_id, rows_per_item: 10}}
model: {{path: "{model}", max_length: 32}}
output: {{path: "{out}"}}
compute: {{batch_rows: 10}}
run: {{progress_interval_s: 0.5, stall_timeout_s: {stall}, startup_timeout_s: 300}}
"""


@pytest.mark.slow
def test_a_hung_replica_fails_the_job_in_the_stall_timeout_and_a_rerun_resumes(ray_local, tmp_path,
                                                                               tiny_embedding_model):
    # The hung job runs as its own process (it must exit, not hang) with a Ray of its own, whose workers inherit
    # the failpoint: on the session's Ray, a driver killed in an earlier test keeps cluster resources reserved
    # in Ray Data's autoscaling coordinator for a while, which would slow this job past the timing below.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    ids = []
    for shard in range(4):
        shard_ids = [f"s{shard}-{i}" for i in range(20)]
        ids += shard_ids
        pq.write_table(pa.table({"doc_id": shard_ids, "text": [f"text {i}" for i in shard_ids]}),
                       corpus / f"part-{shard}.parquet", row_group_size=10)
    out, stall = tmp_path / "out", 10
    cfg = tmp_path / "job.yaml"
    cfg.write_text(CONFIG.format(corpus=corpus, model=tiny_embedding_model, out=out, stall=stall))
    markers = tmp_path / "markers"
    markers.mkdir()
    env = job_process_env(driver_env={"EMBEDRANK_FAILPOINTS": "replica_batch:hang@6",
                                      "EMBEDRANK_FAILPOINT_DIR": str(markers)})
    command = [sys.executable, "-m", "pipelines.cli", "embed", str(cfg), "--json"]

    hung = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    ended = time.time()
    assert hung.returncode == 3, hung.stderr[-3000:]
    assert "stuck stage: MapBatches(EmbedReplica)" in hung.stderr
    hang_started = (markers / "replica_batch").stat().st_mtime
    print(f"hang → exit: {ended - hang_started:.1f}s (stall_timeout_s={stall})")
    assert stall <= ended - hang_started < stall + 60, hung.stderr[-3000:]

    resumed = run_embed(load_config(cfg, ["run.stall_timeout_s=120"], schema=EmbedJobConfig))
    committed_before = resumed["items_skipped"]
    print(f"items committed before the hang: {committed_before} of 8")
    assert 1 <= committed_before < 8 and resumed["items_processed"] == 8 - committed_before
    assert verify_output(str(out)).ok
    assert sorted(read_committed(str(out)).column("id").to_pylist()) == sorted(ids)
