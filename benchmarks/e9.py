"""E9: a whole `embedrank embed` process with default settings against sentence-transformers' `encode`, the peer
a newcomer knows, at 1,000 and 10,000 documents; and the replica alone against the same peer.

    python -m benchmarks.e9                    # about 25 minutes on 2 idle cores (1,000 docs × 2 rounds,
                                               # 10,000 docs × 1 round, the replica alone)
    python -m benchmarks.e9 --quick            # smoke run, about 2 minutes: 160 documents, one round
    python -m benchmarks.e9 --docs 1000 --rounds 3

Corpus and model as E8 (`benchmarks/e8.py`): seeded long-tailed documents (log-normal token counts, median 200,
σ 1.2, capped at 1,024) in 8 local Parquet files; a random-weight Qwen3 of hidden 512 × 2 layers with the real
vocabulary and tokenizer, fp32, carrying the sentence-transformers files of the Qwen3-Embedding hub repos.

- Whole job, per corpus size, in alternating order, each as a process of its own timed from start to exit:
  ours = `embedrank embed CONFIG --json` (config: input, model, output; every other setting the default), st =
  `python -m benchmarks.st_encode` (`SentenceTransformer(DIR).encode`, length-sorted, batch 32, every core).
  Ratio = st time ÷ our time in the same round. Goals: ≥ 1.0× at 1,000 documents, ≥ 1.5× at 10,000.
- Replica ready: when our first replica had its model loaded, in seconds since our process started (the job's
  `startup.started_at` + `replica_ready_s`, against the launch time). Goal ≤ 8 s.
- Replica alone: `TextTokenizer` + `Embedder` (what a replica does with the pipeline's defaults) against `encode`
  in one process, on the first corpus's texts, both on every core, interleaved (`embed_common.interleaved`).
- Vectors: smallest cosine between our committed vector and st's, per document (≥ 0.9999 required).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from benchmarks import e8  # noqa: E402

GOALS = {1000: 1.0, 10000: 1.5}
READY_GOAL_S = 8.0


def run_ours_timed(config: str, out: str) -> dict:
    """`e8.run_ours`, plus when the first replica was ready since the process was launched."""
    launched = time.time()
    run = e8.run_ours(config, out, [])
    p = run["startup"]
    if p.get("replica_ready_s") is not None and p.get("started_at") is not None:
        run["ready_since_launch_s"] = p["started_at"] + p["replica_ready_s"] - launched
    return run


def st_split(run: dict) -> str:
    p = run["phases"]
    return (f"process {run['wall']:.1f}s = imports {p['imports_s']:.1f}s · model load {p['model_load_s']:.1f}s · "
            f"read {p['read_s']:.1f}s · encode {p['embed_s']:.1f}s · write {p['write_s']:.1f}s · interpreter start "
            f"and exit {run['wall'] - p['total_s']:.1f}s")


def whole_job(work: str, args, docs: int, rounds: int) -> dict:
    """Both whole processes on a corpus of `docs` documents, `rounds` times, alternating who goes first."""
    from benchmarks import embed_common as ec

    sized = argparse.Namespace(**{**vars(args), "docs": docs})
    model, corpus, figures = e8.build_assets(work, sized)
    ec.write_sentence_transformers_files(model, e8.MODELS[args.hidden]["hidden_size"], args.cap)
    os.makedirs(os.path.join(work, f"job-{docs}"), exist_ok=True)
    config = e8.job_config(os.path.join(work, f"job-{docs}"), model, corpus)
    print(f"\n{docs:,} documents in {args.shards} Parquet files, {figures['tokens']:,} tokens (median "
          f"{figures['median']}, p90 {figures['p90']}, max {figures['max']})", flush=True)
    runs: dict[str, list[dict]] = {"ours": [], "st": []}
    for r in range(rounds):
        for name in (["ours", "st"] if r % 2 == 0 else ["st", "ours"]):
            out = os.path.join(work, "out", f"{name}-{docs}-{r}")
            run = (e8.run_peer("benchmarks.st_encode", model, corpus, out, args.batch) if name == "st" else run_ours_timed(config, out))
            if run["rows"] != figures["docs"]:
                raise RuntimeError(f"{name} wrote {run['rows']} rows, expected {figures['docs']}")
            runs[name].append(run)
            print(f"  round {r + 1}: {name:<5} {run['wall']:7.1f}s  {docs / run['wall']:7.2f} docs/s  (load average "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    cosine = e8.min_cosine(os.path.join(work, "out", f"ours-{docs}-0"), os.path.join(work, "out", f"st-{docs}-0"))
    return {"docs": docs, "runs": runs, "cosine": cosine, "model": model, "corpus": corpus}


def replica_alone(model: str, corpus: str, args) -> dict:
    """Our replica's code against `encode` in this process, on the corpus's texts, both on every core."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from benchmarks import embed_common as ec

    torch.set_num_threads(os.cpu_count())
    texts = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob(corpus))).column("text").to_pylist()
    ours = ec.Ours(model, 8192, device="cpu", dtype="float32", max_batch_tokens=16384, batch_rows=256,
                   num_threads=os.cpu_count())
    st = ec.SentenceTransformersPeer(model, 8192, device="cpu", dtype=torch.float32, batch=args.batch)
    res = ec.interleaved([ours, st], texts, args.alone_repeats, "cpu",
                         log=lambda line: print(line, flush=True))
    ratios = [s / o for o, s in zip(res["ours"]["times"], res["st"]["times"])]
    delta = ec.max_cos_delta(res["ours"]["vectors"], res["st"]["vectors"])
    return {"texts": len(texts), "ours": res["ours"]["times"], "st": res["st"]["times"], "ratios": ratios,
            "max_cos_delta": delta}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 160 documents, cap 512, one round")
    p.add_argument("--docs", type=int, action="append", default=None,
                   help="corpus sizes (repeatable; default 1000 and 10000; --quick 160)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per size (default 2 at ≤ 1,000 docs, else 1)")
    p.add_argument("--alone-repeats", type=int, default=3, help="rounds of the replica-alone comparison")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--median", type=float, default=200)
    p.add_argument("--sigma", type=float, default=1.2)
    p.add_argument("--cap", type=int, default=None, help="max tokens per document (default 1024; --quick 512)")
    p.add_argument("--hidden", type=int, choices=sorted(e8.MODELS), default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="encode's batch_size")
    p.add_argument("--workdir", default=None, help="keep models and corpora here (reused by the next run)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = args.docs or ([160] if args.quick else [1000, 10000])
    args.cap = args.cap or (512 if args.quick else 1024)

    from benchmarks import embed_common as ec

    ec.quiet()
    began = time.monotonic()
    load = os.getloadavg()
    print(f"E9 · {os.cpu_count()} cores (load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start) · model: "
          f"random Qwen3 {args.hidden} × {args.layers} layers, real vocabulary and tokenizer, fp32 · ours: embedrank "
          f"embed with default settings · st: benchmarks/st_encode.py (SentenceTransformer.encode, batch "
          f"{args.batch}, torch threads = {os.cpu_count()})", flush=True)
    work = args.workdir or tempfile.mkdtemp(prefix="embedrank-e9-")
    os.makedirs(work, exist_ok=True)
    results, alone = [], None
    try:
        for docs in sizes:
            rounds = args.rounds or (1 if args.quick or docs > 1000 else 2)
            results.append(whole_job(work, args, docs, rounds))
        first = results[0]
        print(f"\nreplica alone, {args.alone_repeats} rounds:", flush=True)
        alone = replica_alone(first["model"], first["corpus"], args)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'docs':>7} {'ours s':>8} {'st s':>8} {'st ÷ ours':>20}  goal")
    failed = False
    for res in results:
        ours, st = [r["wall"] for r in res["runs"]["ours"]], [r["wall"] for r in res["runs"]["st"]]
        ratios = [s / o for o, s in zip(ours, st)]
        goal = GOALS.get(res["docs"])
        verdict = "" if goal is None else f"≥ {goal:g}× {'met' if statistics.median(ratios) >= goal else 'NOT met'}"
        print(f"{res['docs']:>7,} {statistics.median(ours):8.1f} {statistics.median(st):8.1f} "
              f"{e8.fmt_ratio(ratios):>20}  {verdict}")
    print()
    for res in results:
        ours_last, st_last = res["runs"]["ours"][-1], res["runs"]["st"][-1]
        print(f"{res['docs']:,} · ours · {e8.ours_split(ours_last)}")
        print(f"{res['docs']:,} · st   · {st_split(st_last)}")
        ok = res["cosine"] >= e8.MIN_COSINE
        failed |= not ok
        print(f"{res['docs']:,} · vectors: smallest cosine ours vs st {res['cosine']:.6f} "
              f"({'≥' if ok else 'BELOW'} {e8.MIN_COSINE})")
    ready = [r["ready_since_launch_s"] for res in results for r in res["runs"]["ours"] if "ready_since_launch_s" in r]
    if ready:
        med = statistics.median(ready)
        print(f"\nreplica ready since our process was launched: median {med:.1f}s over {len(ready)} run(s) "
              f"({min(ready):.1f}–{max(ready):.1f}s); goal ≤ {READY_GOAL_S:g}s {'met' if med <= READY_GOAL_S else 'NOT met'}")
    if alone:
        print(f"replica alone on {alone['texts']:,} texts: ours {statistics.median(alone['ours']):.1f}s, st "
              f"{statistics.median(alone['st']):.1f}s, st ÷ ours {e8.fmt_ratio(alone['ratios'])}; largest 1 − cosine "
              f"{alone['max_cos_delta']:.2e}")
    print(f"E9 total {time.monotonic() - began:.0f}s; load average at end {os.getloadavg()[0]:.1f}")
    if failed or (alone and not np.isfinite(alone["max_cos_delta"])):
        sys.exit(1)


if __name__ == "__main__":
    main()
