"""The start-up phases of a run: collected from the driver and the replicas' reports, printed in the summary."""

import json

import pyarrow as pa

from common.columns import ITEM, ITEM_ROWS, N_TOKENS, REJECT, REPLICA_STARTUP, ROW
from pipelines.output.pieces import write_pieces
from pipelines.output.records import Piece
from pipelines.progress import Startup, startup_line
from pipelines.storage import Storage


def replica(pid, ready_at, imports_s=3.0, load_s=2.2):
    return {"host": "h", "pid": pid, "imports_s": imports_s, "load_s": load_s, "ready_at": ready_at,
            "first_batch_at": ready_at + 0.5}


def test_phases_are_marks_since_the_jobs_start_and_the_first_replica_ready_counts():
    s = Startup(started=100.0)
    s.note_ray("started", 100.2, 106.8)
    s.note_replicas([replica(7, 114.0, 4.0, 3.0)])
    s.note_replicas([replica(6, 112.1), replica(7, 114.0)])  # a report seen twice counts once
    s.first_item = 114.0
    phases = s.to_json()
    assert phases["started_at"] == 100.0  # the marks' origin, on the machine's wall clock
    assert phases["ray"] == "started" and phases["ray_s"] == 6.8 and phases["ray_start_s"] == 6.6
    assert (phases["replica_ready_s"], phases["replica_imports_s"], phases["replica_load_s"]) == (12.1, 3.0, 2.2)
    assert phases["replica_first_batch_s"] == 12.6 and phases["replicas_reported"] == 2
    assert phases["first_item_s"] == 14.0 and phases["wall_s"] > 14.0
    assert startup_line({**phases, "wall_s": 28.9}) == (
        "start-up (since the job's start): Ray 6.8s (local, started in 6.6s) · replica ready 12.1s (imports 3.0s, "
        "model load 2.2s) · its first batch 12.6s · first item committed 14.0s · wall 28.9s")


def test_a_ray_up_before_the_job_counts_as_connected_and_a_joined_one_says_so():
    s = Startup(started=100.0)
    s.note_ray("started", 50.0, 55.0)  # a caller's earlier start in this process, not this job's
    phases = s.to_json()
    assert (phases["ray"], phases["ray_s"], phases["ray_start_s"]) == ("connected", 0.0, 0.0)
    assert phases["replica_ready_s"] is None and phases["first_item_s"] is None and phases["replicas_reported"] == 0
    assert startup_line({**phases, "wall_s": 1.0}) == "start-up (since the job's start): Ray already up · wall 1.0s"
    s.note_ray("joined", 100.5, 101.7)
    assert startup_line({**s.to_json(), "wall_s": 3.0}).startswith(
        "start-up (since the job's start): Ray 1.7s (joined in 1.2s) · wall")


def test_piece_records_carry_the_replica_reports_across_the_task_boundary():
    piece = Piece(item="i", start=0, end=2, item_rows=2, replica_startup=(replica(1, 5.0),))
    table = Piece.table([piece, Piece(item="i", start=2, end=3, item_rows=3)])
    assert table.column("replica_startup").null_count == 1
    assert [Piece.from_row(r) for r in table.to_pylist()] == [piece, Piece(item="i", start=2, end=3, item_rows=3)]


def test_the_write_task_hands_on_each_report_it_sees_once_per_piece(tmp_path):
    report = json.dumps(replica(9, 5.0))
    table = pa.table({ITEM: ["a", "a", "a", "b"], ROW: [0, 1, 2, 0], ITEM_ROWS: [3, 3, 3, 1],
                      REJECT: pa.nulls(4, pa.string()), N_TOKENS: [3, 4, 5, 6], "id": ["x", "y", "z", "w"],
                      REPLICA_STARTUP: [report, report, None, None]})
    out = write_pieces(table, Storage(str(tmp_path)), {"task": "test"}, ["id", N_TOKENS])
    pieces = {p.item: p for p in map(Piece.from_row, out.to_pylist())}
    assert pieces["a"].replica_startup == (json.loads(report),) and pieces["b"].replica_startup == ()
    assert all(REPLICA_STARTUP not in pa.parquet.read_table(tmp_path / f.path).column_names
               for p in pieces.values() for f in p.data_files)
