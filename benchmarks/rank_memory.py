"""Memory of one rerank rank task: a bucket of N scored pairs ranked whole, as `output.rank_buckets` sizes it.

A rank task (`pipelines.rerank.ranking.rank_bucket`, Ray Data map_groups) receives its whole bucket as one Arrow
table (query_id, doc_id, score, _item, _row, _bucket), sorts it, drops duplicate pairs, ranks each query and writes
the ranked Parquet file (one PUT, built in memory). This runs that function, no Ray, on a synthetic bucket in a
fresh process per N and prints:

- table: the bucket's own Arrow size, bytes per pair (what the task is handed);
- peak: the process's peak resident memory during the call above its resident memory with the table built
  (Linux `VmHWM`, reset through `/proc/self/clear_refs`), bytes per pair (what ranking adds);
- task: table + peak, bytes per pair, and what the largest N's figure makes at `MAX_PAIRS_PER_BUCKET` pairs (the
  bucket size that `output.rank_buckets: auto` aims at), on top of the Ray worker's own ~0.2-0.3 GB. Small N
  read high: the allocator's fixed costs weigh more there.

Ids are realistic in length (`q<9 digits>`, `doc-<10 digits>`, 20-hex item ids), candidates are shuffled (a
bucket arrives in block order, not sorted), 1% of pairs are duplicates.

    python -m benchmarks.rank_memory                            # N = 100,000 and 1,000,000 (under a minute)
    python -m benchmarks.rank_memory --pairs 100000 1000000 2000000 --candidates 1000
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ITEM_ROWS = 50_000
"""Rows per work item (the default `input.rows_per_item`): how many distinct `_item` values a bucket has."""


def _status(key: str) -> int:
    """A `/proc/self/status` memory figure in bytes (`VmRSS`, `VmHWM`)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS


def synthetic_bucket(pairs: int, candidates: int, seed: int) -> tuple[pa.Table, dict[str, int]]:
    """One bucket's scored pairs, built with Arrow kernels (no Python strings per row), and its item order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(pairs)
    query = order // candidates
    doc = rng.integers(0, 10 ** 10, size=pairs)
    dup = rng.random(pairs) < 0.01  # 1% repeat the previous row's pair
    doc[1:][dup[1:]] = doc[:-1][dup[1:]]
    query[1:][dup[1:]] = query[:-1][dup[1:]]

    def ids(prefix: str, values: np.ndarray, width: int) -> pa.Array:
        digits = pc.utf8_lpad(pc.cast(pa.array(values), pa.string()), width, "0")
        return pc.binary_join_element_wise(prefix, digits, "")

    n_items = max(1, -(-pairs // ITEM_ROWS))
    item_names = [f"{k:020x}" for k in rng.integers(0, 2 ** 63, size=n_items)]
    item_of = np.arange(pairs) // ITEM_ROWS
    table = pa.table({
        "query_id": ids("q", query, 9), "doc_id": ids("doc-", doc, 10),
        "score": pa.array(rng.random(pairs, dtype=np.float32)),
        "_item": pa.DictionaryArray.from_arrays(pa.array(item_of, pa.int32()), pa.array(item_names)).cast(pa.string()),
        "_row": pa.array(np.arange(pairs) % ITEM_ROWS, pa.int64()),
        "_bucket": pa.array(np.zeros(pairs, np.int64)),
    })
    return table, {name: k for k, name in enumerate(item_names)}


def measure(pairs: int, candidates: int, seed: int) -> dict[str, float]:
    """Rank one bucket of `pairs` pairs in this process; the figures in bytes."""
    from pipelines.rerank.ranking import rank_bucket
    from pipelines.storage import Storage

    with tempfile.TemporaryDirectory() as tmp:
        warm, warm_order = synthetic_bucket(1000, candidates, seed + 1)
        rank_bucket(warm, Storage(tmp), {"benchmark": "rank_memory"}, None, warm_order)  # imports, lazy inits
        del warm
        table, item_order = synthetic_bucket(pairs, candidates, seed)
        gc.collect()
        rss = _status("VmRSS")
        _reset_peak()
        began = time.perf_counter()
        record = rank_bucket(table, Storage(tmp), {"benchmark": "rank_memory"}, None, item_order)
        wall = time.perf_counter() - began
        peak = _status("VmHWM")
    assert record.column("scored")[0].as_py() == pairs
    return {"pairs": pairs, "table": table.nbytes, "peak": peak - rss, "wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--candidates", type=int, default=100, help="candidates per query")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.candidates, args.seed)))
        return

    from pipelines.rerank.ranking import MAX_PAIRS_PER_BUCKET

    print(f"rank task memory: one bucket ranked whole, {args.candidates} candidates per query, "
          f"Arrow pool {pa.default_memory_pool().backend_name}")
    print(f"{'pairs':>12} {'table B/pair':>13} {'peak B/pair':>12} {'task B/pair':>12} {'task GiB':>9} "
          f"{'wall s':>7}")
    per_pair = []
    for n in args.pairs:
        out = subprocess.run([sys.executable, "-m", "benchmarks.rank_memory", "--child", str(n), "--candidates",
                              str(args.candidates), "--seed", str(args.seed)], check=True, capture_output=True,
                             text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        task = r["table"] + r["peak"]
        per_pair.append(task / n)
        print(f"{n:>12,} {r['table'] / n:>13.0f} {r['peak'] / n:>12.0f} {task / n:>12.0f} {task / 2 ** 30:>9.2f} "
              f"{r['wall_s']:>7.2f}")
    largest = per_pair[args.pairs.index(max(args.pairs))]  # fixed costs weigh least there
    print(f"at MAX_PAIRS_PER_BUCKET = {MAX_PAIRS_PER_BUCKET:,} pairs: ≈{largest * MAX_PAIRS_PER_BUCKET / 2 ** 30:.2f} "
          f"GiB per rank task ({largest:.0f} bytes/pair, as at {max(args.pairs):,}), plus the Ray worker itself")


if __name__ == "__main__":
    main()
