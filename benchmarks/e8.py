"""E8: a whole `embedrank embed` process with default settings, start-up included, against the model card's
recipe as a plain script given every core, on the same corpus and model.

    python -m benchmarks.e8              # about 7 minutes on 2 idle cores (2 rounds; much longer when shared)
    python -m benchmarks.e8 --quick      # smoke run, 1-2 minutes: a small corpus, one round
    python -m benchmarks.e8 --variant ours-1t:compute.num_threads=1    # also the default before E8, 1 thread

Corpus: `--docs` seeded long-tailed documents (the generator of `python -m benchmarks`: log-normal token counts,
median `--median`, σ `--sigma`, capped at `--cap`) in `--shards` local Parquet files (`doc_id`, `text`). Model:
a random-weight Qwen3 with the real vocabulary and tokenizer, fp32: hidden 512 × 2 layers by default (the model of
issue 15's finding), `--hidden 1024` for the one of `python -m benchmarks`.

Each round runs, as processes of their own and in alternating order:
- ours: `embedrank embed CONFIG --json`, the config naming only the input, its id and text columns, the model
  and the output: every other setting is the default (`compute` auto, fitted to this machine; the embedded local
  Ray, started and stopped by the job). Timed from process start to exit.
- card: `python -m benchmarks.card_recipe` (the model card's transformers recipe in batches of `--batch`,
  `torch.set_num_threads(os.cpu_count())`), reading the same Parquet files and writing Parquet. Timed the same.
- each `--variant NAME:KEY=VALUE[,KEY=VALUE…]`: ours with those `--set` overrides (to measure an alternative
  default in the same run).

Printed: docs/s of each, the ratio ours ÷ card (card time ÷ our time within a round; median over rounds, min-max),
the goal (≥ 2.0×), where our process's time went (the job's start-up phases from its summary, the rest of the
process outside the job: interpreter, imports and config before it, Ray's shutdown and exit after it) and the
card's, and the agreement of the vectors (smallest cosine between our vector and the card's, per document;
≥ 0.9999 required). An untimed warm-up of each on one shard first fills the page cache.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

GOAL = 2.0
MIN_COSINE = 0.9999
MODELS = {
    512: {"hidden_size": 512, "num_layers": 2, "num_heads": 8, "num_kv_heads": 4, "head_dim": 64,
          "intermediate_size": 1536},
    1024: {"hidden_size": 1024, "num_layers": 2, "num_heads": 16, "num_kv_heads": 8, "head_dim": 128,
           "intermediate_size": 3072},
}


def build_assets(work: str, args) -> tuple[str, str, dict]:
    """The model directory and the corpus glob (built once per work folder), and the corpus's figures."""
    from benchmarks import embed_common as ec

    model = os.path.join(work, f"qwen3-{args.hidden}x{args.layers}")
    if not os.path.exists(os.path.join(model, "config.json")):
        from actors.random_qwen import build_random_qwen3

        build_random_qwen3(model, kind="embedding", **{**MODELS[args.hidden], "num_layers": args.layers})
    corpus = os.path.join(work, f"corpus-{args.docs}-{args.median:g}-{args.sigma:g}-{args.cap}-{args.shards}")
    if not glob.glob(os.path.join(corpus, "*.parquet")):
        from actors.loading import load_tokenizer

        lengths = ec.lognormal_lengths(args.docs, args.median, args.sigma, args.cap, args.seed)
        texts = ec.TextMaker(load_tokenizer(model), args.seed).texts(np.maximum(lengths - 1, 1))
        os.makedirs(corpus + ".tmp", exist_ok=True)
        per = -(-len(texts) // args.shards)
        for s, start in enumerate(range(0, len(texts), per)):
            part = texts[start : start + per]
            pq.write_table(pa.table({"doc_id": [f"doc{start + i:06d}" for i in range(len(part))], "text": part}),
                           os.path.join(corpus + ".tmp", f"part-{s:03d}.parquet"), row_group_size=100)
        os.replace(corpus + ".tmp", corpus)
    tokens = [len(t) for t in _token_counts(model, corpus)]
    return model, os.path.join(corpus, "*.parquet"), {
        "docs": len(tokens), "tokens": int(sum(tokens)), "median": int(np.median(tokens)),
        "p90": int(np.percentile(tokens, 90)), "max": int(max(tokens))}


def _token_counts(model: str, corpus: str) -> list[list[int]]:
    from actors.tokenize import TextTokenizer

    texts = pa.concat_tables(pq.read_table(f) for f in sorted(glob.glob(os.path.join(corpus, "*.parquet"))))
    return TextTokenizer(model, None, 8192, None).encode(texts.column("text").to_pylist())[0]


def job_config(work: str, model: str, corpus: str) -> str:
    """The job's YAML: what to read and write, and the model; nothing else (every other setting's default)."""
    path = os.path.join(work, "e8-job.yaml")
    with open(path, "w") as fh:
        json.dump({"input": {"paths": [corpus], "id_column": "doc_id", "text_column": "text"},
                   "model": {"path": model}, "output": {"path": os.path.join(work, "out", "unset")}}, fh)
    return path


def run_ours(config: str, out: str, sets: list[str]) -> dict:
    embedrank = os.path.join(os.path.dirname(sys.executable), "embedrank")
    cmd = [embedrank, "embed", config, "--json", "--set", f"output.path={out}"]
    for s in sets:
        cmd += ["--set", s]
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(("compute:", "start-up"))]
    return {"wall": wall, "rows": summary["totals"]["rows"], "startup": summary["startup"], "lines": lines}


def run_peer(module: str, model: str, corpus: str, out: str, batch: int) -> dict:
    """A peer script (`python -m MODULE`, `benchmarks.peer_io`'s arguments) as a process of its own, timed from
    launch to exit, with the phases it reports."""
    cmd = [sys.executable, "-m", module, "--model", model, "--input", corpus, "--output", out, "--batch", str(batch)]
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall": wall, "rows": phases["rows"], "phases": phases}


def run_card(model: str, corpus: str, out: str, batch: int) -> dict:
    return run_peer("benchmarks.card_recipe", model, corpus, out, batch)


def _vectors(table: pa.Table) -> dict[str, np.ndarray]:
    col = table.column("embedding").combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
    return dict(zip(table.column("id").to_pylist(), flat))


def min_cosine(ours_out: str, card_out: str) -> float:
    """The smallest cosine between our committed vector and the card's, over every document (NaN: ids differ)."""
    from pipelines.output.reader import read_committed

    ours = _vectors(read_committed(ours_out).select(["id", "embedding"]))
    card = _vectors(pq.read_table(os.path.join(card_out, "part-0.parquet")))
    if set(ours) != set(card):
        return float("nan")
    keys = sorted(ours)
    a, b = np.stack([ours[k] for k in keys]).astype(np.float64), np.stack([card[k] for k in keys]).astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min())


def fmt_ratio(ratios: list[float]) -> str:
    med = statistics.median(ratios)
    return f"{med:.2f}× ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else f"{med:.2f}×"


def ours_split(run: dict) -> str:
    """Where one of our processes' time went."""
    p = run["startup"]
    outside = run["wall"] - p["wall_s"]
    ray = {"started": f"Ray up {p['ray_s']:.1f}s (start {p['ray_start_s']:.1f}s)"}.get(p["ray"], f"Ray {p['ray']}")
    return (f"process {run['wall']:.1f}s = job {p['wall_s']:.1f}s [{ray} · replica ready {p['replica_ready_s']:.1f}s "
            f"(its imports {p['replica_imports_s']:.1f}s, model load {p['replica_load_s']:.1f}s) · its first batch "
            f"{p['replica_first_batch_s']:.1f}s · first item committed {p['first_item_s']:.1f}s · the rest "
            f"{p['wall_s'] - p['replica_ready_s']:.1f}s embedding after the replica was ready] + outside the job "
            f"{outside:.1f}s (interpreter, imports and config before; Ray's shutdown and exit after)")


def card_split(run: dict) -> str:
    p = run["phases"]
    rest = run["wall"] - p["total_s"]
    return (f"process {run['wall']:.1f}s = imports {p['imports_s']:.1f}s · model load {p['model_load_s']:.1f}s · "
            f"read {p['read_s']:.1f}s · embed {p['embed_s']:.1f}s · write {p['write_s']:.1f}s · interpreter start "
            f"and exit {rest:.1f}s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 160 documents, cap 512, one round")
    p.add_argument("--docs", type=int, default=None,
                   help="documents (default 1000: about 140 s of the card's work on 2 idle cores; --quick 160)")
    p.add_argument("--shards", type=int, default=8, help="Parquet files (one work item each by default)")
    p.add_argument("--median", type=float, default=200)
    p.add_argument("--sigma", type=float, default=1.2)
    p.add_argument("--cap", type=int, default=None, help="max tokens per document (default 1024; --quick 512)")
    p.add_argument("--hidden", type=int, choices=sorted(MODELS), default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 2; --quick 1)")
    p.add_argument("--batch", type=int, default=32, help="the card recipe's texts per forward pass")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="also time ours with these --set overrides (repeatable)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    p.add_argument("--workdir", default=None, help="keep model and corpus here (reused by the next run)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.docs = args.docs or (160 if args.quick else 1000)
    args.cap = args.cap or (512 if args.quick else 1024)
    args.rounds = args.rounds or (1 if args.quick else 2)
    variants = []
    for v in args.variant:
        name, sep, sets = v.partition(":")
        if not sep or not name or name in ("ours", "card"):
            p.error(f"--variant {v!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
        variants.append((name, [s for s in sets.split(",") if s]))

    from benchmarks import embed_common as ec

    ec.quiet()
    began = time.monotonic()
    work = args.workdir or tempfile.mkdtemp(prefix="embedrank-e8-")
    os.makedirs(work, exist_ok=True)
    try:
        model, corpus, figures = build_assets(work, args)
        config = job_config(work, model, corpus)
        load = os.getloadavg()
        print(f"E8 · {os.cpu_count()} cores (load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start) · "
              f"model: random Qwen3 {args.hidden} × {args.layers} layers, real vocabulary and tokenizer, fp32 · "
              f"corpus: {figures['docs']:,} documents in {args.shards} Parquet files, {figures['tokens']:,} tokens "
              f"(median {figures['median']}, p90 {figures['p90']}, max {figures['max']})", flush=True)
        print(f"ours: embedrank embed with default settings (config: input, model, output only); card: "
              f"benchmarks/card_recipe.py, batch {args.batch}, torch threads = {os.cpu_count()}", flush=True)
        for s in glob.glob(os.path.join(model, "*")):  # the page cache, for everyone
            with open(s, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        if not args.no_warmup:
            first = sorted(glob.glob(corpus))[0]
            os.makedirs(os.path.join(work, "warm"), exist_ok=True)
            warm_config = job_config(os.path.join(work, "warm"), model, first)
            w_ours = run_ours(warm_config, os.path.join(work, "out", "warm-ours"), [])
            w_card = run_card(model, first, os.path.join(work, "out", "warm-card"), args.batch)
            print(f"warm-up on 1 of {args.shards} files (untimed): ours {w_ours['wall']:.1f}s, card "
                  f"{w_card['wall']:.1f}s", flush=True)
        names = ["ours", "card"] + [n for n, _ in variants]
        sets = dict(variants)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            if r % 2:
                order = order[::-1]
            for name in order:
                out = os.path.join(work, "out", f"{name}-{r}")
                run = (run_card(model, corpus, out, args.batch) if name == "card"
                       else run_ours(config, out, sets.get(name, [])))
                if run["rows"] != figures["docs"]:
                    raise RuntimeError(f"{name} wrote {run['rows']} rows, expected {figures['docs']}")
                runs[name].append(run)
                print(f"  round {r + 1}: {name:<10} {run['wall']:7.1f}s  {figures['docs'] / run['wall']:6.2f} docs/s "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        cosine = min_cosine(os.path.join(work, "out", "ours-0"), os.path.join(work, "out", "card-0"))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    n = figures["docs"]
    card_times = [c["wall"] for c in runs["card"]]
    print()
    print(f"{'':<10} {'docs/s':>8} {'median s':>9} {'ours ÷ card':>22}  goal")
    print(f"{'card':<10} {n / statistics.median(card_times):8.2f} {statistics.median(card_times):9.1f}")
    for name in ["ours"] + [v for v, _ in variants]:
        times = [x["wall"] for x in runs[name]]
        ratios = [c / t for c, t in zip(card_times, times)]
        met = "met" if statistics.median(ratios) >= GOAL else "NOT met"
        print(f"{name:<10} {n / statistics.median(times):8.2f} {statistics.median(times):9.1f} "
              f"{fmt_ratio(ratios):>22}  ≥ {GOAL:g}× {met if name == 'ours' else ''}")
    print()
    for name in ["ours"] + [v for v, _ in variants]:
        last = runs[name][-1]
        for line in last["lines"]:
            print(f"{name} · {line}")
        print(f"{name} · {ours_split(last)}")
    print(f"card · {card_split(runs['card'][-1])}")
    ok = cosine >= MIN_COSINE
    print(f"\nvectors: smallest cosine ours vs card over {n:,} documents {cosine:.6f} "
          f"({'≥' if ok else 'BELOW'} {MIN_COSINE})")
    ratio = fmt_ratio([c / t["wall"] for c, t in zip(card_times, runs["ours"])])
    print(f"E8 ours ÷ card: {ratio} (goal ≥ {GOAL:g}×); total {time.monotonic() - began:.0f}s; load average at "
          f"end {os.getloadavg()[0]:.1f}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
