"""The Parquet in / Parquet out around a peer script's model code (`card_recipe`, `st_encode`): its arguments,
reading the texts, writing the vectors and printing its phases, so that each peer script holds only its recipe."""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def arguments(description: str, argv: list[str] | None, **extra: dict) -> argparse.Namespace:
    """--model, --input (a glob), --output, the id and text columns, --batch and --threads; `extra`: more
    options as name → `add_argument` keywords."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="model directory (or hub id)")
    parser.add_argument("--input", required=True, help="glob of Parquet files")
    parser.add_argument("--output", required=True, help="output folder (gets part-0.parquet)")
    parser.add_argument("--id-column", default="doc_id")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--batch", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    for name, kwargs in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    return parser.parse_args(argv)


def read_texts(args: argparse.Namespace) -> tuple[list, list[str]]:
    """(ids, texts) of every input file, in file order."""
    table = pa.concat_tables(pq.read_table(f, columns=[args.id_column, args.text_column])
                             for f in sorted(glob.glob(args.input)))
    return table.column(args.id_column).to_pylist(), table.column(args.text_column).to_pylist()


def write_vectors(args: argparse.Namespace, ids: list, matrix: np.ndarray) -> None:
    """`id` and `embedding` (fixed-size float32 lists) in OUTPUT/part-0.parquet."""
    os.makedirs(args.output, exist_ok=True)
    flat = pa.array(np.asarray(matrix, np.float32).reshape(-1), pa.float32())
    pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])}),
                   os.path.join(args.output, "part-0.parquet"))


def report(phases: dict[str, float], started: float, rows: int, threads: int) -> None:
    """The one JSON line the launcher reads: rows, threads and the phases (seconds), with the total since
    `started` (the script's first line)."""
    phases["total_s"] = time.perf_counter() - started
    print(json.dumps({"rows": rows, "threads": threads, **{k: round(v, 3) for k, v in phases.items()}}),
          flush=True)
