"""Models in object storage: fetched once per node into a checksummed local cache, then loaded like a local dir."""

import fcntl
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import ModelLoadError
from common.model_cache import MANIFEST, ensure_local_model, is_model_url, local_model_dir, remote_model
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import embed_fingerprint, run_embed
from pipelines.preflight import preflight_model

REPO = pathlib.Path(__file__).resolve().parents[2]


def put_fake_model(fs, prefix, weights=b"", extra=None):
    """A model-shaped remote dir (the cache never parses weights), plus files a model does not need."""
    files = {"config.json": json.dumps({"model_type": "qwen3", "architectures": ["Qwen3Model"],
                                        "hidden_size": 64}).encode(), "tokenizer.json": b'{"fake": 1}',
             "model.safetensors": weights or os.urandom(4 << 20), "README.md": b"card",
             "modeling_qwen3.py": b"raise SystemExit('remote code must never be fetched')", **(extra or {})}
    for name, data in files.items():
        if data is not None:
            fs.pipe(f"{prefix}/{name}", data)
    return files


def test_hub_ids_and_local_paths_are_not_urls():
    assert not is_model_url("Qwen/Qwen3-Embedding-0.6B") and not is_model_url("/models/qwen3")
    assert is_model_url("s3://bucket/models/qwen3-embedding-0.6b/") and is_model_url("gs://b/m")


def local_model_vectors(model, texts):
    """What a replica computes from the local directory for one call holding `texts` (same budget, one thread)."""
    import torch

    from actors.embedder import Embedder
    from actors.tokenize import TextTokenizer, ids_to_arrow

    threads = torch.get_num_threads()
    try:
        ids = ids_to_arrow(TextTokenizer(str(model), None, 32, None).encode(texts)[0])
        embedder = Embedder(str(model), dtype="float32", max_batch_tokens=1024, num_threads=1)
        return embedder.embed_ids(ids.values.to_numpy(), ids.offsets.to_numpy())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
def test_embed_with_a_model_in_s3_matches_the_local_model_bit_for_bit(
        ray_local, s3_bucket, s3_server, tiny_embedding_model, tmp_path, capfd):
    from pipelines.output.reader import read_committed

    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    for f in pathlib.Path(tiny_embedding_model).iterdir():
        fs.put_file(str(f), f"{bucket}/models/qwen3-tiny/{f.name}")
    url = f"s3://{bucket}/models/qwen3-tiny/"
    rng = np.random.default_rng(7)
    words = "object storage models are fetched once per node and checksummed".split()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(40)]
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(40)], "text": texts}), corpus / "a.parquet")

    def run(model_path, model_opts, out):
        cfg = EmbedJobConfig.model_validate({
            "input": {"paths": [str(corpus)], "id_column": "doc_id", "rows_per_item": 40},
            "model": {"path": model_path, "max_length": 32, "max_batch_tokens": 1024,
                      "storage_options": model_opts},
            "output": {"path": str(tmp_path / out)},
            "compute": {"batch_rows": 40}, "run": {"progress_interval_s": 0.5}})
        run_embed(cfg)
        return read_committed(str(tmp_path / out)).sort_by("id")

    remote = run(url, opts, "from-s3")
    local = local_model_vectors(tiny_embedding_model, texts)
    assert remote.num_rows == 40
    order = [int(i[1:]) for i in remote.column("id").to_pylist()]
    a = np.stack(remote.column("embedding").to_numpy(zero_copy_only=False))
    assert a.tobytes() == local[order].tobytes()

    job = json.loads((tmp_path / "from-s3" / "_job.json").read_text())
    assert job["fingerprint"]["model"] == url
    assert job["fingerprint"]["model_digest"] == remote_model(url, opts).digest
    cache = pathlib.Path(os.environ["EMBEDRANK_MODEL_CACHE"])
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name.startswith("qwen3-tiny-"))
    assert len(entries) == 2 and entries[1].endswith("-tokenizer"), entries  # replica: full; tokenize: no weights
    assert not list((cache / entries[1]).glob("*.safetensors"))
    secret = opts["secret"]
    assert secret not in capfd.readouterr().err
    for path in list((tmp_path / "from-s3").rglob("*")) + list(cache.rglob("*")):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


CHILD = r"""
import json, sys
from common.model_cache import ensure_local_model
url, cache = sys.argv[1], sys.argv[2]
opts = json.loads(sys.stdin.readline())
print("ready", file=sys.stderr, flush=True)
result = ensure_local_model(url, opts, cache)
print(json.dumps({"path": result.path, "downloaded": result.downloaded}))
"""


@pytest.mark.integration
def test_three_processes_on_one_node_download_once(s3_bucket, s3_server, tmp_path):
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    files = put_fake_model(fs, f"{bucket}/models/m", weights=os.urandom(16 << 20))
    url, cache = f"s3://{bucket}/models/m", tmp_path / "cache"
    cache.mkdir()
    name = remote_model(url, opts).entry_name(weights=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Hold the entry's lock so that all three are provably waiting at once; then let them race.
    holder = os.open(cache / f"{name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    procs, logs = [], []
    try:
        for i in range(3):
            logs.append(tmp_path / f"child-{i}.err")
            procs.append(subprocess.Popen([sys.executable, "-c", CHILD, url, str(cache)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=open(logs[-1], "w"), text=True, env=env))
            procs[-1].stdin.write(json.dumps(opts) + "\n")
            procs[-1].stdin.close()
        deadline = time.monotonic() + 30
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [log.read_text() for log in logs]
            time.sleep(0.05)
    finally:
        os.close(holder)
    results = []
    for p in procs:
        p.wait(timeout=60)
        out = p.stdout.read()
        assert p.returncode == 0, [log.read_text() for log in logs]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["downloaded"] for r in results) == 1, results
    assert len({r["path"] for r in results}) == 1
    entry = pathlib.Path(results[0]["path"])
    assert entry.parent == cache and entry.name == name
    assert sorted(p.name for p in entry.iterdir()) == sorted([MANIFEST, "config.json", "tokenizer.json",
                                                              "model.safetensors"])  # no README, no .py
    for n in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (entry / n).read_bytes() == files[n]
    assert sorted(p.name for p in cache.iterdir()) == sorted([name, f"{name}.lock"])  # no partial left


@pytest.mark.integration
def test_pickle_only_and_incomplete_remote_dirs_are_refused(s3_bucket, s3_server, tmp_path):
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    fs.pipe(f"{bucket}/pickled/config.json", b'{"hidden_size": 64}')
    fs.pipe(f"{bucket}/pickled/pytorch_model.bin", b"\x80\x04 pickle")
    fs.pipe(f"{bucket}/noconfig/model.safetensors", b"weights")
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=r"no \.safetensors weights \(only pickle files \['pytorch_model\.bin'\]"):
        local_model_dir(f"s3://{bucket}/pickled/", opts, str(cache))
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        preflight_model(f"s3://{bucket}/pickled/", storage_options=opts)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        local_model_dir(f"s3://{bucket}/noconfig", opts, str(cache))
    with pytest.raises(ModelLoadError, match="does not exist"):
        preflight_model(f"s3://{bucket}/nothing-here/", storage_options=opts)
    assert not cache.exists() or not any(cache.iterdir())  # nothing fetched
    bad = dict(opts, secret="wrong-canary-" + opts["secret"])
    with pytest.raises(ModelLoadError, match="access denied|cannot list") as denied:
        local_model_dir(f"s3://{bucket}/pickled/", bad, str(cache))
    assert bad["secret"] not in str(denied.value) and opts["secret"] not in str(denied.value)


@pytest.mark.integration
def test_a_damaged_cache_is_fetched_again_and_a_changed_remote_model_is_noticed(s3_bucket, s3_server, tmp_path,
                                                                                 capfd):
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    prefix, url, cache = f"{bucket}/models/m", f"s3://{bucket}/models/m/", str(tmp_path / "cache")
    files = put_fake_model(fs, prefix)
    first = ensure_local_model(url, opts, cache)
    assert first.downloaded and not ensure_local_model(url, opts, cache).downloaded

    weights = pathlib.Path(first.path) / "model.safetensors"
    with open(weights, "r+b") as fh:  # one byte flipped in place: same size, different content
        fh.seek(12345)
        byte = fh.read(1)
        fh.seek(12345)
        fh.write(bytes([byte[0] ^ 0xFF]))
    again = ensure_local_model(url, opts, cache)
    assert again.downloaded and again.path == first.path
    assert weights.read_bytes() == files["model.safetensors"]
    assert "(model.safetensors: sha256 differs from the manifest); fetching it again" in capfd.readouterr().err

    tok = ensure_local_model(url, opts, cache, weights=False)
    assert tok.path != first.path and sorted(os.listdir(tok.path)) == sorted([MANIFEST, "config.json",
                                                                              "tokenizer.json"])

    cfg = EmbedJobConfig.model_validate({"input": {"paths": ["unused"]}, "output": {"path": "unused"},
                                         "model": {"path": url, "storage_options": opts, "dimensions": 128}})
    before = embed_fingerprint(cfg)["model_digest"]
    with pytest.raises(ModelLoadError, match="dimensions=128 exceeds the model's embedding size 64"):
        preflight_model(url, 128, opts)
    with pytest.raises(ModelLoadError, match="model.revision is for hub ids"):
        preflight_model(url, None, opts, revision="main")

    fs.pipe(f"{prefix}/model.safetensors", os.urandom(4 << 20))  # the remote model changes
    assert embed_fingerprint(cfg)["model_digest"] != before  # so the resume guard refuses the old output
    with pytest.raises(ModelLoadError, match="changed since the job started"):
        local_model_dir(url, opts, cache, expected_digest=before)
    changed = ensure_local_model(url, opts, cache)
    assert changed.downloaded and changed.path != first.path
