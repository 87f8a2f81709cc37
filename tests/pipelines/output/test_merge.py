"""An item that reaches the writers in several pieces commits as reader-sized files: its consecutive pieces are
merged (one file per partition folder, one for rejects) before its commit record is written, and a merge that
dies loses and duplicates nothing.

The unit tests write real pieces with the write stage and merge them on local disk and on the S3 server; the
integration tests run real jobs whose items Ray Data splits (`run.block_mb` far below an item) and kill a merge
task, and the driver during a merge.
"""

import hashlib
import io
import json
import re
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import job_process_env, job_summary

from common.errors import OutputError
from pipelines.input.plan import WorkItem
from pipelines.output.committer import Committer
from pipelines.output.merge import merge_item, pack
from pipelines.output.pieces import FINGERPRINT_KEY, rows_within, write_pieces
from pipelines.output.reader import read_committed
from pipelines.output.records import ItemCommit, Piece
from pipelines.output.root import OutputRoot
from pipelines.output.verify import verify_output

ITEM = "0123456789abcdef0123"
FINGERPRINT = {"model": "tiny", "dimensions": 4}
COLUMNS = ["id", "embedding", "n_tokens", "lang"]
ROWS = 30


def batch(rows, rejects=()):
    """The write stage's input for `rows` of ITEM (of ROWS): 4-d vectors, a `lang` partition column."""
    rows = list(rows)
    vectors = np.array([[r, r + 0.25, r + 0.5, r + 0.75] for r in rows], dtype=np.float32)
    return pa.table({
        "_item": [ITEM] * len(rows), "_row": pa.array(rows, pa.int64()), "_item_rows": [ROWS] * len(rows),
        "_reject": [("empty_text" if r in rejects else None) for r in rows],
        "id": [f"doc-{r}" for r in rows],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 4),
        "n_tokens": pa.array([1 + r % 5 for r in rows], pa.int64()),
        "lang": ["en" if r % 3 else "de" for r in rows],
    })


def write(store, rows, rejects=(), target=None, partition="lang"):
    out = write_pieces(batch(rows, rejects), store, FINGERPRINT, COLUMNS, partition_by=partition,
                       target_file_bytes=target)
    return [Piece.from_row(r) for r in out.to_pylist()]


def read(store, ref):
    data = store.read_bytes(ref.path)
    assert hashlib.sha256(data).hexdigest() == ref.sha256 and len(data) == ref.bytes
    table = pq.read_table(io.BytesIO(data))
    assert table.num_rows == ref.rows
    return table


def test_pieces_of_an_item_merge_into_one_file_per_folder_with_rows_in_order(store):
    pieces = write(store, range(0, 10), rejects={3}) + write(store, range(10, 20)) + write(store, range(20, 30),
                                                                                          rejects={25, 29})
    [merged] = merge_item(store, pieces, target_bytes=2**30)
    assert (merged.item, merged.start, merged.end, merged.item_rows) == (ITEM, 0, 30, 30)
    by_folder = {f.path.rsplit("/", 1)[0]: f for f in merged.data_files}
    assert sorted(by_folder) == ["data/lang=de", "data/lang=en"]
    for folder, ref in by_folder.items():
        assert re.fullmatch(rf"{folder}/{ITEM}-0-29-e0-[0-9a-f]{{12}}\.parquet", ref.path)
        table = read(store, ref)
        expect = [r for r in range(30) if r not in {3, 25, 29} and (("en" if r % 3 else "de") in folder)]
        assert table.column("id").to_pylist() == [f"doc-{r}" for r in expect]
        assert table.column("embedding").to_pylist() == [[r, r + 0.25, r + 0.5, r + 0.75] for r in expect]
        assert json.loads(table.schema.metadata[FINGERPRINT_KEY]) == FINGERPRINT
    rejects = read(store, merged.reject_file)
    assert merged.reject_file.path.startswith(f"_rejects/{ITEM}-0-29-")
    assert rejects.column("row").to_pylist() == [3, 25, 29] and merged.reject_reasons == {"empty_text": 3}
    assert merged.tokens == sum(p.tokens for p in pieces) == sum(1 + r % 5 for r in range(30) if r not in {3, 25, 29})
    assert sum(merged.length_hist) == 27


def test_a_target_smaller_than_the_item_keeps_files_within_it_and_a_lone_piece_as_it_is(store):
    pieces = [p for a in range(0, 30, 5) for p in write(store, range(a, a + 5), partition=None)]
    size = pieces[0].data_files[0].bytes
    assert all(p.data_files[0].bytes == size or abs(p.data_files[0].bytes - size) < 64 for p in pieces)
    target = 2.5 * size  # two pieces fit, three do not
    assert [len(g) for g in pack(pieces, target)] == [2, 2, 2]
    merged = merge_item(store, pieces, target)
    assert [(p.start, p.end) for p in merged] == [(0, 10), (10, 20), (20, 30)]
    assert all(f.bytes <= target for p in merged for f in p.data_files)
    lone = merge_item(store, pieces[:2], size)  # nothing fits together: kept as written
    assert lone == pieces[:2]


def test_the_writer_cuts_a_run_larger_than_the_target_into_consecutive_pieces(store):
    table = batch(range(ROWS)).select(COLUMNS)
    target = 7.5 * table.nbytes / ROWS  # 7 rows a file
    pieces = write(store, range(ROWS), target=target, partition=None)
    assert rows_within(table, target) == 7
    assert [(p.start, p.end) for p in pieces] == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 30)]
    assert [read(store, p.data_files[0]).column("id").to_pylist() for p in pieces][1] == [f"doc-{r}" for r in
                                                                                          range(7, 14)]


def test_wide_float32_vectors_are_cut_at_the_target_in_reader_sized_row_groups(tmp_path, monkeypatch):
    """An 8B model's 4096-d float32 vectors: 16 KiB a row. Files stay within the target, row groups within
    `ROW_GROUP_BYTES` (shrunk here so that a file holds several)."""
    from pipelines.output import pieces as pieces_module
    from pipelines.storage import Storage

    monkeypatch.setattr(pieces_module, "ROW_GROUP_BYTES", 2 * 2**20)
    rows, dim = 2000, 4096
    vectors = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    table = pa.table({"_item": [ITEM] * rows, "_row": pa.array(range(rows), pa.int64()), "_item_rows": [rows] * rows,
                      "_reject": pa.nulls(rows, pa.string()), "id": [f"doc-{r}" for r in range(rows)],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
                      "n_tokens": pa.array([8] * rows, pa.int64())})
    store = Storage(str(tmp_path / "out"))
    target = 10 * 2**20
    written = [Piece.from_row(r) for r in write_pieces(table, store, FINGERPRINT, ["id", "embedding", "n_tokens"],
                                                      target_file_bytes=target).to_pylist()]
    step = written[1].start  # 10 MiB ÷ (16 KiB of vector + id and count) ≈ 639 rows
    assert 630 <= step <= 640 and [(p.start, p.end) for p in written] == [(0, step), (step, 2 * step),
                                                                          (2 * step, 3 * step), (3 * step, rows)]
    for piece in written:
        [ref] = piece.data_files
        assert ref.bytes <= target
        meta = pq.ParquetFile(io.BytesIO(store.read_bytes(ref.path))).metadata
        assert meta.num_rows == piece.end - piece.start and (meta.num_row_groups > 1 or piece is written[-1])
        assert all(meta.row_group(g).total_byte_size <= 2 * 2**20 for g in range(meta.num_row_groups))
    merged = merge_item(store, written, target)  # compressed, the last two fit one file; no others do
    assert merged[:2] == written[:2] and [(p.start, p.end) for p in merged[2:]] == [(2 * step, rows)]
    assert merged[2].data_files[0].bytes <= target and merged[2].data_files[0].rows == rows - 2 * step


def item(rows=ROWS):
    return WorkItem(item_id=ITEM, url="x", rel="x.parquet", format="parquet", row_start=0, row_end=rows,
                    row_groups=None, est_tokens=0)


def test_the_committer_commits_an_item_merged_once_and_its_pieces_become_orphans(store):
    pieces = write(store, range(10, 20)) + write(store, range(0, 10)) + write(store, range(20, 30))
    root = OutputRoot(store)
    committer = Committer(root, "fp", [item()], target_file_bytes=2**30)
    got = [c for p in [pieces[2], pieces[0], pieces[0], pieces[1]] for c in committer.add(p)]
    got += committer.finish()
    assert len(got) == 1 and not committer.pending
    record = ItemCommit.from_json(root.read_json(f"_commits/{ITEM}.json"))
    assert record == got[0] and record.rows == 30 and len(record.files) == 2
    assert all((f.first_row, f.end_row) == (0, 30) for f in record.files)
    assert committer.merged.items == 1 and committer.merged.pieces == 3 and committer.merged.files == 2
    sources = sorted(f.path for p in pieces for f in p.data_files)
    assert sorted(root.orphans([record])) == sources  # the record exists and names none of them
    rows = pa.concat_tables([read(store, f) for f in record.files]).column("id").to_pylist()
    assert sorted(rows) == sorted(f"doc-{r}" for r in range(30))


def test_a_merge_that_hangs_fails_the_job_as_a_stalled_stage_and_commits_nothing(store):
    from pipelines.watchdog import PipelineStalled

    release = threading.Event()
    pieces = write(store, range(0, 15), partition=None) + write(store, range(15, 30), partition=None)
    committer = Committer(OutputRoot(store), "fp", [item()], target_file_bytes=2**30,
                          merge=lambda p: release.wait() and p)
    for p in pieces:
        assert committer.add(p) == []
    with pytest.raises(PipelineStalled, match="1 item merge.s. did not finish within run.stall_timeout_s"):
        committer.finish(stall_timeout_s=0.2)
    release.set()
    assert not store.exists(f"_commits/{ITEM}.json")


def test_a_piece_changed_under_the_merge_fails_the_item_by_name_and_commits_nothing(store):
    pieces = write(store, range(0, 15), partition=None) + write(store, range(15, 30), partition=None)
    store.write_bytes(pieces[1].data_files[0].path, b"not the bytes the writer reported")
    committer = Committer(OutputRoot(store), "fp", [item()], target_file_bytes=2**30)
    for p in pieces:
        committer.add(p)
    with pytest.raises(OutputError, match="checksum differs"):
        committer.finish()
    assert not store.exists(f"_commits/{ITEM}.json") and ITEM in committer.pending


CONFIG = """
input: {{paths: ["{corpus}/*.parquet"], id_column: doc_id, rows_per_item: 120}}
model: {{path: "{model}", max_length: 32}}
output: {{path: "{out}"}}
compute: {{batch_rows: 20}}
run: {{progress_interval_s: 0.5, block_mb: {block_mb}}}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge-corpus")
    texts = {f"d{i:03d}": f"text {i} " + "word " * (i % 13) for i in range(240)}
    pq.write_table(pa.table({"doc_id": list(texts), "text": list(texts.values())}), folder / "docs.parquet",
                   row_group_size=120)
    return folder, texts


def run_job(tmp_path, name, corpus, model, ray_address, block_mb, failpoints=None):
    """The job as its own process; `failpoints` reach its driver and its Ray workers (each fires once)."""
    cfg = tmp_path / f"{name}.yaml"
    out = tmp_path / name
    cfg.write_text(CONFIG.format(corpus=corpus, model=model, out=out, block_mb=block_mb))
    points = {"EMBEDRANK_FAILPOINT_DIR": str(tmp_path), "EMBEDRANK_FAILPOINTS": failpoints} if failpoints else None
    env = job_process_env(worker_env=points)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "embed", str(cfg), "--json",
                           "--set", f"run.ray_address={ray_address}"], capture_output=True, text=True, env=env,
                          timeout=300)
    return proc.returncode, job_summary(proc.returncode, proc.stdout), proc.stderr, out


def data_files_per_item(out):
    return [len(json.loads(c.read_text())["files"]) for c in sorted((out / "_commits").glob("*.json"))]


def reference_vectors(model, texts):
    """The vectors `actors.embedder` computes for `texts` outside any pipeline (its parity with the card's recipe
    is tests/actors/test_embedder_parity.py)."""
    from actors.embedder import Embedder
    from actors.tokenize import TextTokenizer, ids_to_arrow

    ids = ids_to_arrow(TextTokenizer(str(model), None, 32, None).encode(texts)[0])
    return Embedder(str(model), dtype="float32").embed_ids(ids.values.to_numpy(), ids.offsets.to_numpy())


@pytest.mark.integration
@pytest.mark.slow
def test_split_items_commit_as_one_file_each_through_a_killed_merge_task_and_a_killed_driver(
        tmp_path, corpus, tiny_embedding_model, session_ray):
    """Blocks of 4 KiB split each 120-row item into many pieces. The first run's first merge task dies after
    writing its file (Ray retries it), then the driver dies when a merge returns, before its commit record; the
    rerun finishes. Every item ends as one data file holding its rows exactly once, with the recipe's vectors."""
    folder, texts = corpus
    code, _, err, out = run_job(tmp_path, "split", folder, tiny_embedding_model, session_ray, 0.004,
                                failpoints="merge_write,after_merge")
    assert code == 137, err[-3000:]
    assert (tmp_path / "merge_write").exists() and (tmp_path / "after_merge").exists()
    assert not list((out / "_commits").glob("*.json")), "the driver died before any merged item committed"
    assert len(list((out / "data").glob("*.parquet"))) > 2, "the items were not split into pieces"

    code, summary, err, out = run_job(tmp_path, "split", folder, tiny_embedding_model, session_ray, 0.004)
    assert code == 0, err[-3000:]
    assert summary["merged"]["items"] == 2 and summary["merged"]["pieces"] > 4 and summary["merged"]["files"] == 2
    assert re.search(r"merged: 2 item\(s\) that arrived in \d+ pieces, into 2 file\(s\)", err)
    assert data_files_per_item(out) == [1, 1]
    assert len(list((out / "data").glob("*.parquet"))) == 2  # the pieces and the dead run's files are gone
    report = verify_output(str(out))
    assert report.ok and report.counts["orphans"] == 0, report.problems
    for commit in sorted((out / "_commits").glob("*.json")):  # each file: its item's rows, in row order
        record = json.loads(commit.read_text())
        ids = pq.read_table(out / record["files"][0]["path"]).column("id").to_pylist()
        assert ids == [f"d{i:03d}" for i in range(record["row_start"], record["row_end"])]
    table = read_committed(str(out)).sort_by("id")
    want = reference_vectors(tiny_embedding_model, [texts[i] for i in table.column("id").to_pylist()])
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), want, rtol=0, atol=1e-5)
