"""`embedrank verify`: quick (control files and sizes), and full in the driver or as a Ray Data job, one Report.

One small embedding output is built per module on the session Ray; each case corrupts a copy of it.
"""

import hashlib
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output import verify
from pipelines.output.records import FileRef
from pipelines.output.root import COMMITS_DIR
from pipelines.output.verify import verify_output
from pipelines.output.verify_files import (
    FILE_RESULT,
    KEY,
    KEY_BUCKET,
    KEY_HASH,
    KEY_KIND,
    VERIFY_OUT,
    Named,
    check_file,
    group_keys_stage,
)
from pipelines.storage import Storage
from support.vector_output import build_vector_output

pytestmark = pytest.mark.integration

SHARDS, ROWS = 3, 30
FILES = 6 * 2 + 1
"""Files the commits name: each of the 6 items' rows in two partition files, and one rejects file."""


@pytest.fixture(scope="module")
def built(ray_local, tiny_embedding_model, tmp_path_factory):
    """A finished embedding output: 3 shards of 30 rows in items of 15, one row rejected (null text), partitioned
    by `lang` (each item's rows in two files, under data/lang=de/ and data/lang=en/)."""
    base = tmp_path_factory.mktemp("verify")
    corpus = base / "corpus"
    corpus.mkdir()
    for shard in range(SHARDS):
        texts = [f"document {shard}-{i} " + "word " * (i % 7) for i in range(ROWS)]
        if shard == 0:
            texts[4] = None
        pq.write_table(pa.table({"doc_id": [f"s{shard}-{i}" for i in range(ROWS)],
                                 "text": pa.array(texts, pa.string()), "lang": ["en" if i % 2 else "de" for i in range(ROWS)]}),
                       corpus / f"part-{shard}.parquet", row_group_size=15)
    out = base / "out"
    run_embed(EmbedJobConfig.model_validate({
        "input": {"paths": [f"{corpus}/*.parquet"], "id_column": "doc_id", "passthrough_columns": ["lang"],
                  "rows_per_item": 15},
        "model": {"path": str(tiny_embedding_model), "max_length": 32},
        "output": {"path": str(out), "partition_by": "lang"},
        "compute": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1, "batch_rows": 32},
    }))
    return out


def copy(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built, out)
    return out


def commits(out):
    """Commit records that name data files, by item, in item-id order."""
    found = {}
    for f in sorted((out / COMMITS_DIR).iterdir()):
        record = json.loads(f.read_text())
        if record["files"]:
            found[record["item"]] = record
    return found


def save(out, record):
    (out / COMMITS_DIR / f"{record['item']}.json").write_text(json.dumps(record))


def rewrite(out, record, table):
    """Replace the commit's (first) data file with `table`, updating the record's checksum and size only."""
    ref = record["files"][0]
    pq.write_table(table, out / ref["path"])
    data = (out / ref["path"]).read_bytes()
    ref["sha256"], ref["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    save(out, record)


def both(out, buckets=None):
    """The full check by both engines (the ray engine's keys in `buckets` hash buckets); their Reports must be
    equal. Each Report says the engine that ran: the local one checked every file in this process; the ray one
    in Ray worker processes, none of them this one (a Ray Data job ran: replacing it by the local engine fails
    here). Returns (local, ray)."""
    local = verify_output(str(out), engine="local")
    ray = verify_output(str(out), engine="ray", buckets=buckets)
    assert (local.checked["engine"], ray.checked["engine"]) == ("local", "ray")
    assert local.checked["pids"] == [os.getpid()]
    assert ray.checked["pids"] and os.getpid() not in ray.checked["pids"], ray.checked
    assert ray.problems == local.problems and ray.counts == local.counts
    return local, ray


def test_a_good_output_passes_every_way_with_the_same_counts(built):
    full, on_ray = both(built)
    assert full.ok, full.problems
    assert (on_ray.checked["buckets"], on_ray.checked["key_buckets"]) == (1, 1)  # 90 keys: one bucket by default
    assert full.counts == {"items": 6, "committed_items": 6, "rows": SHARDS * ROWS - 1, "rejected": 1,
                           "unique_ids": SHARDS * ROWS, "orphans": 0, "pending_uploads": 0}
    quick = verify_output(str(built), quick=True)
    assert quick.ok, quick.problems
    assert quick.checked["mode"] == "quick" and quick.checked["files"] == FILES
    assert quick.checked["rows"] == SHARDS * ROWS and quick.checked["bytes"] > 0
    assert {k: quick.counts[k] for k in ("rows", "rejected", "committed_items")} == {
        "rows": SHARDS * ROWS - 1, "rejected": 1, "committed_items": 6}
    assert verify_output(str(built)).checked["engine"] == "local"  # auto, 90 rows


def test_each_corruption_is_found_by_both_engines_with_the_same_text(built, tmp_path):
    out = copy(built, tmp_path)
    source, dup, bad_sum, gone, short = list(commits(out).values())[:5]
    first_id = pq.read_table(out / source["files"][0]["path"]).column("id")[0].as_py()
    assert first_id not in pq.read_table(out / dup["files"][0]["path"]).column("id").to_pylist()
    table = pq.read_table(out / dup["files"][0]["path"])
    rewrite(out, dup, table.set_column(0, "id", pa.array([first_id] + table.column("id").to_pylist()[1:])))
    path = out / bad_sum["files"][0]["path"]
    pq.write_table(pq.read_table(path), path, compression="gzip")  # the same rows in other bytes
    (out / gone["files"][0]["path"]).unlink()
    rewrite(out, short, pq.read_table(out / short["files"][0]["path"]).slice(1))

    # the duplicate's two rows sit in two files of two commits; the ray engine spreads the keys over 16 hash
    # buckets, and the two rows must still meet in one (grouping by file, or by anything but the key, misses it)
    report, on_ray = both(out, buckets=16)
    assert on_ray.checked["buckets"] == 16 and on_ray.checked["key_buckets"] > 1, on_ray.checked
    lost, rows = gone["files"][0]["rows"], short["files"][0]["rows"]
    assert sorted(report.problems) == sorted([
        f"{bad_sum['files'][0]['path']}: checksum differs from commit {bad_sum['item']}",
        f"{gone['files'][0]['path']} named by commit {gone['item']} is missing",
        f"{short['files'][0]['path']}: {rows - 1} rows, commit {short['item']} says {rows}",
        f"commit {gone['item']}: files hold {15 - lost} rows, the item has 15",
        f"commit {short['item']}: files hold 14 rows, the item has 15",
        f"1 id(s) appear more than once (e.g. {first_id!r})",
    ])
    assert report.counts["unique_ids"] == SHARDS * ROWS - 1 - lost - 1
    assert report.counts["rows"] == SHARDS * ROWS - 1 - lost - 1


def fixed(values, arrow_type) -> pa.FixedSizeListArray:
    """Rows of `values` (a list of lists) as `fixed_size_list<arrow_type>[width]`, written here with pyarrow."""
    width = len(values[0])
    return pa.FixedSizeListArray.from_arrays(pa.array([x for row in values for x in row], arrow_type), width)


def test_vectors_of_the_wrong_type_width_or_norm_are_found_by_both_engines(ray_local, tmp_path):
    """Files rewritten with pyarrow, their records' sha256 and sizes updated (row counts unchanged): only the
    vector checks can catch them. The fingerprint names f32 float32 (pooled width 16), i8 int8[8], bits ubinary
    (pooled width: 2 bytes)."""
    out = tmp_path / "out"
    build_vector_output(Storage(str(out)), items=(1, 2, 3, 4, 5))
    assert both(out)[0].ok
    narrow, half, wide, extra, scaled = commits(out).values()
    paths = {name: r["files"][0]["path"] for name, r in
             {"narrow": narrow, "half": half, "wide": wide, "extra": extra, "scaled": scaled}.items()}

    t = pq.read_table(out / paths["narrow"])  # int8[8] cut to 7
    rewrite(out, narrow, t.set_column(t.schema.get_field_index("i8"), "i8",
                                      fixed([r[:7] for r in t.column("i8").to_pylist()], pa.int8())))
    t = pq.read_table(out / paths["half"])  # the same values as float16
    rewrite(out, half, t.set_column(t.schema.get_field_index("f32"), "f32",
                                    fixed(t.column("f32").to_pylist(), pa.float16())))
    t = pq.read_table(out / paths["wide"])  # packed bits one byte wider than every other file's
    rewrite(out, wide, t.set_column(t.schema.get_field_index("bits"), "bits",
                                    fixed([r + [0] for r in t.column("bits").to_pylist()], pa.uint8())))
    t = pq.read_table(out / paths["extra"])  # a vector column the fingerprint does not name
    rewrite(out, extra, t.append_column("f8", fixed([r[:8] for r in t.column("f32").to_pylist()], pa.float32())))
    t = pq.read_table(out / paths["scaled"])  # row 1's float vector doubled
    rows = t.column("f32").to_pylist()
    rows[1] = [2 * x for x in rows[1]]
    rewrite(out, scaled, t.set_column(t.schema.get_field_index("f32"), "f32", fixed(rows, pa.float32())))

    local, _ = both(out)
    assert sorted(local.problems) == sorted([
        f"{paths['narrow']}: column 'i8' is fixed_size_list<int8>[7], the fingerprint says fixed_size_list<int8>[8]",
        f"{paths['half']}: column 'f32' is fixed_size_list<halffloat>[16], the fingerprint says "
        "fixed_size_list<float>[the pooled width]",
        f"{paths['wide']}: column 'bits' is fixed_size_list<uint8>[3], the output's other files have "
        "fixed_size_list<uint8>[2]",
        f"{paths['extra']}: vector column 'f8' is not one of the fingerprint's ['f32', 'i8', 'bits']",
        f"{paths['scaled']}: 1 vector(s) of 'f32' are not L2-unit (row 1: norm 2, tolerance 0.001)",
    ])
    assert local.counts["rows"] == 15 and local.counts["unique_ids"] == 15  # rows and ids are all there


def test_the_default_embedding_column_is_checked_too(built, tmp_path):
    """Without `output.vectors` the fingerprint's one `embedding` column (float32, the pooled width) is checked:
    a file whose vectors lost a value (re-normalised, so only the width is wrong), and one whose column is gone."""
    out = copy(built, tmp_path)
    cut, gone = list(commits(out).values())[:2]
    t = pq.read_table(out / cut["files"][0]["path"])
    rows = [[x / sum(v * v for v in r[:-1]) ** 0.5 for x in r[:-1]] for r in t.column("embedding").to_pylist()]
    rewrite(out, cut, t.set_column(t.schema.get_field_index("embedding"), "embedding", fixed(rows, pa.float32())))
    t = pq.read_table(out / gone["files"][0]["path"])
    rewrite(out, gone, t.drop_columns(["embedding"]))
    problems = verify_output(str(out), engine="local").problems
    assert sorted(problems) == sorted([
        f"{cut['files'][0]['path']}: column 'embedding' is fixed_size_list<float>[63], the output's other files have "
        "fixed_size_list<float>[64]",
        f"{gone['files'][0]['path']}: no vector column 'embedding' (the fingerprint's fixed_size_list<float>[the "
        "pooled width])",
    ])


def test_quick_checks_sizes_and_presence_without_reading_a_data_file(built, tmp_path):
    out = copy(built, tmp_path)
    first, second = list(commits(out).values())[:2]
    path = out / first["files"][0]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    assert verify_output(str(out), quick=True).ok  # sizes match: a quick check cannot tell
    assert f"{first['files'][0]['path']}: checksum differs from commit {first['item']}" in verify_output(
        str(out), engine="local").problems

    (out / second["files"][0]["path"]).unlink()
    with open(path, "ab") as fh:
        fh.write(b"tail")
    quick = verify_output(str(out), quick=True)
    assert sorted(quick.problems) == sorted([
        (f"{first['files'][0]['path']}: {first['files'][0]['bytes'] + 4} bytes, commit {first['item']} says "
         f"{first['files'][0]['bytes']}"),
        f"{second['files'][0]['path']} named by commit {second['item']} is missing",
    ])


def test_quick_checks_that_records_tile_their_items(built, tmp_path):
    out = copy(built, tmp_path)
    record = next(iter(commits(out).values()))
    record["files"][0]["rows"] -= 2
    save(out, record)
    assert verify_output(str(out), quick=True).problems == [
        f"commit {record['item']}: its records name 13 rows, the item has 15"]


def test_on_s3_quick_lists_sizes_and_the_engines_agree(built, s3_bucket, s3_server):
    bucket, options = s3_bucket
    fs = s3_server.filesystem()
    fs.put(str(built), f"{bucket}/out", recursive=True)
    out = f"s3://{bucket}/out"
    quick = verify_output(out, options, quick=True)
    assert quick.ok and quick.checked == verify_output(str(built), quick=True).checked
    victim = next(iter(commits(built).values()))["files"][0]["path"]
    fs.rm(f"{bucket}/out/{victim}")
    assert any(p.startswith(f"{victim} named by") for p in verify_output(out, options, quick=True).problems)
    local, ray = verify_output(out, options, engine="local"), verify_output(out, options, engine="ray")
    assert not local.ok and (ray.problems, ray.counts) == (local.problems, local.counts)


def test_the_cli_flags(built, tmp_path, capsys, monkeypatch):
    assert main(["verify", str(built), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert f"checked (quick: control files and listed sizes, no data file read): {FILES} file(s), 90 row(s)" in printed
    assert "invariant holds" in printed

    out = copy(built, tmp_path)
    victim = next(iter(commits(out).values()))
    (out / victim["files"][0]["path"]).unlink()
    monkeypatch.setattr(verify, "AUTO_LOCAL_MAX_ROWS", 10)  # auto picks the ray engine above it
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"checked (full, engine ray: checksums, row counts, duplicate keys): {FILES} file(s), 90 row(s)" in printed
    assert f"problem: {victim['files'][0]['path']} named by commit {victim['item']} is missing" in printed
    assert "invariant VIOLATED (2 problem(s))" in printed

    assert main(["verify", str(out), "--engine", "local"]) == 1
    assert "engine local" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(out), "--engine", "spark"])
    assert exit_.value.code == 2 and "invalid choice: 'spark'" in capsys.readouterr().err


def test_exact_keys_decide_where_hashes_collide():
    """Two different keys under one hash are no duplicate; one key twice is, whatever else shares its hash."""
    group = pa.table({KEY_BUCKET: [0] * 5, KEY_HASH: [7, 7, 9, 9, 9], KEY_KIND: ["id"] * 5,
                      KEY: ["a", "b", "c", "c", "d"], FILE_RESULT: pa.nulls(5, pa.string())})
    out = [json.loads(r) for r in group_keys_stage(group).column(VERIFY_OUT).to_pylist()]
    assert out == [{"bucket": 0, "keys": 5, "pid": os.getpid()}, {"kind": "id", "keys": 1, "extra": 1, "example": "c"}]


def test_a_rank_file_must_hold_whole_queries_ranked_once(tmp_path):
    storage = Storage(str(tmp_path))

    def problems(query_ids, doc_ids, ranks, top_k=None):
        pq.write_table(pa.table({"query_id": query_ids, "doc_id": doc_ids, "score": [0.5] * len(ranks),
                                 "rank": pa.array(ranks, pa.int32())}), tmp_path / "r.parquet")
        data = (tmp_path / "r.parquet").read_bytes()
        ref = FileRef("r.parquet", len(ranks), hashlib.sha256(data).hexdigest(), len(data))
        result, keys = check_file(storage, Named(0, ref, "rank commit 0", None, "ranked"), top_k)
        assert keys["query"].to_pylist() == sorted(set(query_ids))
        return result["problems"]

    assert problems(["q1", "q1", "q2"], ["a", "b", "a"], [2, 1, 1]) == []
    assert problems(["q1", "q2", "q2", "q2"], ["a", "a", "b", "c"], [1, 1, 1, 2]) == [
        "r.parquet: ranks of query 'q2' are not 1..n (top_k=None)"]
    assert problems(["q1", "q1", "q1"], ["a", "b", "c"], [1, 2, 3], top_k=2) == [
        "r.parquet: ranks of query 'q1' are not 1..n (top_k=2)"]
    assert problems(["q1", "q1"], ["a", "a"], [1, 2]) == ["r.parquet: a (query_id, doc_id) pair appears more than once"]
