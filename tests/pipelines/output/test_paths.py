"""Hostile ids and partition values never write outside the output prefix and read back unchanged."""

import posixpath
import urllib.parse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.pieces import HIVE_NULL, partition_folder
from pipelines.output.reader import read_committed
from pipelines.output.root import OutputRoot
from pipelines.output.verify import verify_output
from pipelines.storage import Storage

HOSTILE = ["../x", "a/b", "../../../../etc/passwd", "/abs", "..", ".", "nul\x00byte", "new\nline", "%2F%2e%2e",
           "a=b", "tab\tand space", "é 🙂", "", "back\\slash", "plain"]
TOO_LONG = "z" * 300


def test_partition_folder_is_one_safe_segment():
    for value in HOSTILE:
        folder = partition_folder("lang", value)
        assert "/" not in folder and "\x00" not in folder and "\n" not in folder and folder.startswith("lang=")
        assert urllib.parse.unquote(folder[len("lang="):]) == value
    assert partition_folder("lang", None) == f"lang={HIVE_NULL}"
    assert partition_folder("year", 2024) == "year=2024"


def test_partition_by_must_be_a_passthrough_column(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: {paths: [x]}\nmodel: {path: m}\noutput: {path: o, partition_by: lang}\n")
    with pytest.raises(ConfigError, match=r"partition_by 'lang' must be one of input.passthrough_columns \[\]"):
        load_config(cfg, schema=EmbedJobConfig)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(corpus url, output url, storage options, a function listing every file the test's storage holds)."""
    if request.param == "local":
        def everything():
            return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
        return str(tmp_path / "corpus"), str(tmp_path / "out"), {}, everything
    bucket, opts = request.getfixturevalue("s3_bucket")
    fs = Storage(f"s3://{bucket}", opts).fs

    def everything():
        fs.invalidate_cache()
        return sorted(posixpath.relpath(p, bucket) for p in fs.find(bucket))
    return f"s3://{bucket}/corpus", f"s3://{bucket}/out", opts, everything


@pytest.mark.integration
def test_hostile_ids_and_partition_values_stay_inside_the_output(ray_local, where, tiny_embedding_model):
    corpus, out, opts, everything = where
    langs = HOSTILE + [None, TOO_LONG]
    ids = [f"{v}" if v is not None else "none" for v in HOSTILE] + ["\x00", "../long"]
    rows = pa.table({"doc_id": ids, "text": [f"text {i}" for i in range(len(ids))], "lang": langs})
    corpus_storage = Storage(corpus, opts)
    buf = pa.BufferOutputStream()
    pq.write_table(rows, buf)
    corpus_storage.write_bytes("hostile.parquet", buf.getvalue().to_pybytes())

    cfg = EmbedJobConfig.model_validate({
        "input": {"paths": [f"{corpus}/*.parquet"], "id_column": "doc_id", "passthrough_columns": ["lang"],
                  "storage_options": opts, "rows_per_item": 8},
        "model": {"path": str(tiny_embedding_model), "max_length": 16},
        "output": {"path": out, "partition_by": "lang"},
    })
    summary = run_embed(cfg)

    assert verify_output(out, opts).ok
    assert summary["totals"]["reject_reasons"] == {"partition_value_too_long": 1}
    got = read_committed(out, opts)
    expected = {(i, v) for i, v in zip(ids, langs) if v != TOO_LONG}
    assert sorted(zip(got.column("id").to_pylist(), got.column("lang").to_pylist()), key=repr) == sorted(
        expected, key=repr)
    rejected = read_committed(out, opts, rejects=True)
    assert rejected.column("id").to_pylist() == ["../long"]

    files = everything()
    assert files and all(f.startswith(("out/", "corpus/")) for f in files), files
    root = OutputRoot(Storage(out, opts))
    commits = root.read_commits()
    for c in commits.values():
        for f in c.files:
            parts = f.path.split("/")
            assert len(parts) == 3 and parts[0] == "data" and parts[1].startswith("lang=") and ".." not in parts
            value = urllib.parse.unquote(parts[1][len("lang="):])
            table = pq.read_table(pa.BufferReader(root.storage.read_bytes(f.path)))
            assert set(table.column("lang").to_pylist()) == {None if value == HIVE_NULL else value}

    dataset = pads.dataset(root.storage.path("data"), filesystem=root.storage.fs, format="parquet",
                           partitioning="hive")
    read_back = [(r["id"], r["lang"]) for r in dataset.to_table(columns=["id", "lang"]).to_pylist()]
    assert sorted(read_back, key=repr) == sorted(expected, key=repr)
