"""A reindex killed part-way through its build publishes nothing: readers keep the previous version, exactly;
`embedrank versions` lists the half-built one as unpublished; a rerun resumes and publishes it, and it equals a
clean reindex bit for bit.

test_reindex.py kills a run after its by-reference commits (before any row is embedded); here every item is
rebuilt, so the kill lands after two items the build itself embedded and committed. The other crash point the
issue names, between the version's `_SUCCESS` and the `_CURRENT.json` pointer, has no failpoint in
`pipelines/` (`close_output` writes `_SUCCESS` and the report, then `IndexRoot.publish` writes the pointer,
with no `failpoints.hit` between them), so it is not covered here.

Each row is embedded alone (`max_batch_tokens: 1`), so that a vector depends on its text only (see
test_reindex.py) and a carried vector equals a recomputed one bit for bit.
"""

import io
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import job_process_env

from pipelines.output.reader import read_committed
from pipelines.output.verify import verify_output
from pipelines.reindex.config import ReindexJobConfig
from pipelines.reindex.index import CURRENT_FILE, IndexRoot
from pipelines.reindex.job import run_reindex
from pipelines.storage import Storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def snapshot(folder, edited: bool) -> str:
    """Two files of 30 documents (3 items of 10 rows each); `edited` changes one document in each item, so no
    item keeps its content digest and every item of the next version is rebuilt (9 of its 10 rows carried)."""
    folder.mkdir()
    for f in ("a", "b"):
        ids = [f"{f}{i}" for i in range(30)]
        texts = [f"{d} is about " + "word " * (i % 7) + ("edited" if edited and i % 10 == 4 else "") for i, d in
                 enumerate(ids)]
        pq.write_table(pa.table({"doc_id": ids, "text": texts}), folder / f"{f}.parquet", row_group_size=10)
    return str(folder / "*.parquet")


def spec(paths: str, index: str, model, ray_address: str | None = None) -> dict:
    run = {"progress_interval_s": 0.5, **({"ray_address": ray_address} if ray_address else {})}
    return {"input": {"paths": [paths], "id_column": "doc_id", "rows_per_item": 10},
            "model": {"path": str(model), "max_length": 32, "max_batch_tokens": 1},
            "index": {"path": index, "diff_partitions": 2},
            "compute": {"batch_rows": 16}, "run": run}


def reindex(data: dict) -> dict:
    return run_reindex(ReindexJobConfig.model_validate(data), stream=io.StringIO())


def by_id(table: pa.Table) -> pa.Table:
    return table.sort_by("id")


def vectors(table: pa.Table) -> np.ndarray:
    emb = table.column("embedding").combine_chunks()
    return emb.values.to_numpy().reshape(len(emb), -1)


@pytest.fixture(scope="module")
def built(ray_local, tiny_embedding_model, tmp_path_factory):
    """What both crash cases start from and end at, built once: v1 of snapshot 1, and a clean reindex of
    snapshot 2 on top of it (the reference a crashed and resumed reindex must equal bit for bit)."""
    root = tmp_path_factory.mktemp("reindex-crashes")
    snap1, snap2 = snapshot(root / "snap1", False), snapshot(root / "snap2", True)
    v1_url = str(root / "v1")
    assert reindex(spec(snap1, v1_url, tiny_embedding_model))["published"] == "v000001"
    clean_url = str(root / "clean")
    shutil.copytree(v1_url, clean_url)
    assert reindex(spec(snap2, clean_url, tiny_embedding_model))["published"] == "v000002"
    return snap1, snap2, v1_url, by_id(read_committed(clean_url))


@pytest.mark.parametrize("failpoint, committed_at_kill, success_at_kill", [
    ("after_commit_write@2", 2, False),  # mid-build
    ("before_pointer_write", 6, True),  # the version is complete (`_SUCCESS`), the pointer not yet written
])
def test_reindex_killed_mid_build_keeps_the_previous_version_and_resumes(
        built, session_ray, tiny_embedding_model, tmp_path, failpoint, committed_at_kill, success_at_kill):
    _, snap2, v1_url, clean = built
    index_url = str(tmp_path / "index")
    shutil.copytree(v1_url, index_url)  # v1 of snapshot 1, published
    index = IndexRoot(Storage(index_url))
    v1 = by_id(read_committed(index_url))
    assert v1.num_rows == 60

    # the next version, as its own driver process joined to the session's Ray, killed at `failpoint`
    cfg = tmp_path / "reindex2.yaml"
    cfg.write_text(json.dumps(spec(snap2, index_url, tiny_embedding_model, session_ray)))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "reindex", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=job_process_env(driver_env={"EMBEDRANK_FAILPOINTS": failpoint}))
    reads = 0
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        seen = by_id(read_committed(index_url))  # a reader during the build sees v1, exactly
        assert seen.equals(v1)
        reads += 1
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 137 and reads > 0, err[-3000:]

    v2 = index.version_root("v000002")
    assert len(v2.commit_ids()) == committed_at_kill and len(v2.planned_item_ids()) == 6
    assert all(c.carried_from is None and c.rows == 10 for c in v2.read_commits().values())  # built, not kept
    assert (tmp_path / "index" / "v000002" / "_SUCCESS").exists() == success_at_kill
    assert index.current()["version"] == "v000001"
    assert json.loads((tmp_path / "index" / CURRENT_FILE).read_text())["version"] == "v000001"
    assert by_id(read_committed(index_url)).equals(v1)  # after the crash too
    listed = subprocess.run([sys.executable, "-m", "pipelines.cli", "versions", index_url, "--json"],
                            capture_output=True, text=True, timeout=120, env=job_process_env(), check=False)
    assert listed.returncode == 0, listed.stderr
    states = {r["version"]: r["state"] for r in json.loads(listed.stdout.strip().splitlines()[-1])}
    assert states["v000001"] == "current" and states["v000002"].startswith("unpublished"), states

    # a rerun resumes the unpublished version and publishes it
    resumed = reindex(spec(snap2, index_url, tiny_embedding_model))
    assert resumed["resumed"] and resumed["published"] == "v000002"
    assert resumed["counts"]["changed"] == 6 and resumed["counts"]["unchanged"] == 54
    assert resumed["embedded_rows_in_version"] == 6 and resumed["carried_rows"] == 54
    assert index.current()["version"] == "v000002"
    assert verify_output(index_url).ok
    got = by_id(read_committed(index_url))
    assert got.column("id").equals(v1.column("id"))

    # equal to a clean reindex of the same two snapshots, bit for bit
    assert got.column("id").equals(clean.column("id"))
    assert np.array_equal(vectors(got), vectors(clean))
    assert not np.array_equal(vectors(got), vectors(v1))  # the edited documents did change
