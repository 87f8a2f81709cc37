"""Data-file layout, side by side: Parquet's defaults vs embedrank's vector encoding, and what a merge costs.

    python -m benchmarks.file_layout [--rows 50000] [--dim 1024] [--pieces 20]

1. One work item of unit vectors (the default 50,000 rows, 1024-d), float32 and float16, written with
   `pq.write_table(..., compression="zstd")` defaults and with `pipelines.output.pieces._parquet_bytes` (no
   dictionary or statistics on the vector column, float32 values byte-stream-split, ~128 MiB row groups):
   bytes per row and write and read seconds, and the ratios.
2. The same item written as `--pieces` pieces by the write stage, then merged into one file by
   `pipelines.output.merge.merge_item` on local disk: seconds and MB/s of merged output (the merge reads and
   writes the item once).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def item_table(rows: int, dim: int, dtype: str, seed: int = 0) -> pa.Table:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    values = pa.array(vectors.ravel().astype(dtype), pa.float16() if dtype == "float16" else pa.float32())
    return pa.table({"id": [f"doc-{r:09d}" for r in range(rows)],
                     "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
                     "n_tokens": pa.array(np.random.default_rng(seed).integers(1, 512, rows)),
                     "truncated": pa.array(np.zeros(rows, dtype=bool))})


def best_of(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _defaults(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def layout(rows: int, dim: int) -> None:
    from pipelines.output.pieces import _parquet_bytes

    print(f"1. one item: {rows:,} rows × {dim}-d unit vectors (best of 3)")
    print(f"   {'dtype':8} {'writer':10} {'B/row':>8} {'write s':>8} {'read s':>7}")
    for dtype in ("float32", "float16"):
        table = item_table(rows, dim, dtype)
        figures = {}
        for name, write in (("defaults", _defaults), ("embedrank", lambda t: _parquet_bytes(t, "{}"))):
            write_s, data = best_of(lambda: write(table))
            read_s, back = best_of(lambda: pq.read_table(io.BytesIO(data)))
            assert back.select(table.column_names).equals(table)
            figures[name] = (len(data), write_s, read_s)
            print(f"   {dtype:8} {name:10} {len(data) / rows:8.1f} {write_s:8.3f} {read_s:7.3f}")
        (db, dw, dr), (eb, ew, er) = figures["defaults"], figures["embedrank"]
        print(f"   {dtype:8} ratio      size {eb / db:.3f}× · write {dw / ew:.2f}× faster · read {dr / er:.2f}× faster")


def merge_cost(rows: int, dim: int, pieces: int) -> None:
    from pipelines.output.merge import merge_item
    from pipelines.output.pieces import write_pieces
    from pipelines.output.records import Piece
    from pipelines.storage import Storage

    table = item_table(rows, dim, "float32")
    item = "0123456789abcdef0123"
    extra = pa.table({"_item": [item] * rows, "_row": pa.array(range(rows), pa.int64()),
                      "_item_rows": [rows] * rows, "_reject": pa.nulls(rows, pa.string())})
    full = pa.table({**{c: extra.column(c) for c in extra.column_names}, **{c: table.column(c) for c in
                                                                          table.column_names}})
    with tempfile.TemporaryDirectory(prefix="embedrank-merge-bench-") as tmp:
        store = Storage(tmp)
        step = -(-rows // pieces)
        written = [Piece.from_row(r) for a in range(0, rows, step)
                   for r in write_pieces(full.slice(a, step), store, {}, table.column_names).to_pylist()]
        seconds, merged = best_of(lambda: merge_item(store, written, 2**40))
        size = merged[0].data_files[0].bytes
        print(f"2. merge: {len(written)} pieces of one {rows:,}-row item → 1 file of {size / 2**20:.1f} MiB in "
              f"{seconds:.2f}s ({size / 2**20 / seconds:.0f} MiB/s of output, local disk, one core)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--pieces", type=int, default=20)
    args = parser.parse_args(argv)
    layout(args.rows, args.dim)
    merge_cost(args.rows, args.dim, args.pieces)


if __name__ == "__main__":
    main()
