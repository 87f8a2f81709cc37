"""Model replicas SIGKILLed mid-job: Ray restarts them, the job finishes, rows come out once, bytes unchanged.

The bytes are compared with what one replica computes in this process for each work item (24 rows, one
replica call each), so no second job is needed."""

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import read_committed
from pipelines.output.verify import verify_output

pytestmark = [pytest.mark.integration, pytest.mark.slow]
def replica_pids():
    """Live embedding replicas, from Ray's actor table in the GCS (the state API's HTTP server needs the
    dashboard, which the tests keep off)."""
    from ray._private.state import state

    return [a["Pid"] for a in state.actor_table(None).values()
            if a["State"] == "ALIVE" and "EmbedReplica" in a["ActorClassName"] and a.get("Pid")]


def one_replica_per_item(model, texts, item_rows=24):
    """The vectors one undisturbed replica computes, one call per work item, in this process (one thread)."""
    import torch

    from actors.embedder import Embedder
    from actors.tokenize import TextTokenizer, ids_to_arrow

    threads = torch.get_num_threads()
    try:
        tokenizer = TextTokenizer(str(model), None, 64, None)
        embedder = Embedder(str(model), dtype="float32", num_threads=1)
        out = []
        for start in range(0, len(texts), item_rows):
            ids = ids_to_arrow(tokenizer.encode(texts[start:start + item_rows])[0])
            out.append(embedder.embed_ids(ids.values.to_numpy(), ids.offsets.to_numpy()))
        return np.concatenate(out)
    finally:
        torch.set_num_threads(threads)


def config(corpus, out, model):
    return EmbedJobConfig.model_validate({
        "input": {"paths": [str(corpus / "*.parquet")], "id_column": "doc_id", "rows_per_item": 24},
        "model": {"path": str(model), "max_length": 64},
        "output": {"path": str(out)},
        "compute": {"batch_rows": 24},
        "run": {"progress_interval_s": 1},
    })


def test_replicas_killed_three_times_change_nothing(ray_local, tmp_path, tiny_embedding_model, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(3)
    words = "replicas die and come back while rows keep flowing through the pool".split()
    ids = [f"d{i}" for i in range(720)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) for _ in ids]
    for shard in range(3):
        part = slice(shard * 240, (shard + 1) * 240)
        pq.write_table(pa.table({"doc_id": ids[part], "text": texts[part]}), corpus / f"p{shard}.parquet",
                       row_group_size=24)

    # The chaos run's replicas sleep 0.5 s per batch (failpoint `delay`), so the job cannot outrun the kills:
    # unthrottled, a restarted replica once did 19 items between two polls of the actor table.
    from pipelines import graph

    model_pool = graph.model_pool
    monkeypatch.setattr(graph, "model_pool", lambda compute: {
        **model_pool(compute), "runtime_env": {"env_vars": {"EMBEDRANK_FAILPOINTS": "replica_batch:delay=0.5"}}})
    result, kills = {}, []
    job = threading.Thread(target=lambda: result.update(
        summary=run_embed(config(corpus, tmp_path / "chaos", tiny_embedding_model))), daemon=True)
    job.start()
    deadline = time.monotonic() + 300
    while len(kills) < 3 and job.is_alive() and time.monotonic() < deadline:
        commits = tmp_path / "chaos" / "_commits"
        done = len(list(commits.glob("*.json"))) if commits.exists() else 0
        pids = replica_pids()
        if pids and done >= (kills[-1][1] if kills else 0) + 3:  # each kill 3+ items after the last: 9 of 30
            os.kill(pids[0], signal.SIGKILL)
            kills.append((pids[0], done))
        time.sleep(0.2)
    job.join(timeout=600)
    assert len(kills) == 3, f"only {len(kills)} kill(s) happened before the job ended: {kills}"
    assert "summary" in result, "the job did not finish"

    report = verify_output(str(tmp_path / "chaos"))
    assert report.ok, report.problems
    records = [json.loads(c.read_text()) for c in (tmp_path / "chaos" / "_commits").glob("*.json")]
    assert len(records) == 30 and all(len(r["files"]) == 1 for r in records)  # killed mid-item: still one file each
    chaos = read_committed(str(tmp_path / "chaos")).sort_by("id")
    assert chaos.column("id").to_pylist() == sorted(ids)
    got = np.stack(chaos.column("embedding").to_numpy(zero_copy_only=False))
    order = [int(i[1:]) for i in chaos.column("id").to_pylist()]
    assert got.tobytes() == one_replica_per_item(tiny_embedding_model, texts)[order].tobytes()
    print(f"\nkilled replicas {kills} (pid, items committed at the kill); output identical to an undisturbed replica")
