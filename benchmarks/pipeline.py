"""The whole job on local Ray against its bare replica, against Ray Data's documented pattern, and its memory.

    python -m benchmarks.pipeline            # default, about 10 minutes on 2 idle cores (longer when shared)
    python -m benchmarks.pipeline --quick    # smoke run, 2-3 minutes: tiny model, small corpora, one round

Everything runs on one local Ray started before any timing (`ray.init(address="local", num_cpus=--ray-cpus)`,
2 by default), on local Parquet files (`doc_id`, `text`; `--shards` files, one work item each) with the
corpus generator of `python -m benchmarks` (log-normal token counts, median `--median`, σ `--sigma`, capped at
`--cap`). Model: the realistic CPU Qwen3 of `python -m benchmarks` (random weights, hidden 1024, 2 layers, the
real vocabulary and tokenizer, fp32); `--quick` (or `--model tiny`) uses the tiny random Qwen3 instead, so its
E3/E4 ratios only show that the benchmark runs.

- E3: our full `embedrank embed` job (`run_embed`: plan, read + tokenize tasks, one replica actor with
  `--replica-cpus` CPUs, write tasks, commit) against our bare replica (`TextTokenizer` + `Embedder` in this
  process, `int(--replica-cpus)` torch threads, texts already in memory) on the same corpus. Ratio = job
  docs/s ÷ bare docs/s; goal ≥ 0.85.
- E4: our full job against the pattern Ray Data documents: `read_parquet` → `map_batches(CardEmbedder,
  batch_size=32, compute=ActorPoolStrategy(size=1), num_cpus=--replica-cpus)` → `write_parquet`, where
  CardEmbedder is the Qwen3-Embedding model card recipe (`embed_common.Card`: padding=True, truncation,
  max_length, last-token pool, F.normalize). Ratio = our docs/s ÷ theirs; goal ≥ 2.
- E7: peak memory of our job on a corpus of `--mem-docs` documents and on one 10× as large (same file and
  item size, so 10× the files; tiny model), RSS summed over the driver and every process under its raylet
  (workers, actors, Ray's agents), sampled every 0.2 s on a thread. Ratio = peak(10×) ÷ peak(1×); goal ≤ 1.15.

Timing: an untimed warm-up job and an untimed warm-up peer run on the first shard start Ray's worker processes
and fill the page cache; then each round runs job, bare replica and peer (order rotated each round), each job
and peer run into a fresh output. Every job and peer run starts its own actor, which imports torch and loads
the model: that start-up is inside their times (the bare replica's model is loaded once, before timing; its
load time is printed). The ratio is the median over rounds of the ratio within a round.

The replica gets `--replica-cpus` (default 1) so that the CPU tasks (0.25 CPU each, or 1 for Ray Data's own
read and write tasks) still fit: on a 2-CPU Ray a replica asking for 2 CPUs leaves the read stage unscheduled
and the job stalls.
"""

from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks import embed_common as ec  # noqa: E402

GOALS = {"E3": (0.85, ">="), "E4": (2.0, ">="), "E7": (1.15, "<=")}
REALISTIC = {"hidden_size": 1024, "num_layers": 2, "num_heads": 16, "num_kv_heads": 8, "head_dim": 128,
             "intermediate_size": 3072}


# ---------------------------------------------------------------- corpus files

def write_corpus(folder: str, texts: list[str], rows_per_file: int, prefix: str = "doc") -> str:
    """Parquet files of `rows_per_file` rows (`doc_id`, `text`); returns their glob."""
    os.makedirs(folder, exist_ok=True)
    for f, start in enumerate(range(0, len(texts), rows_per_file)):
        part = texts[start : start + rows_per_file]
        ids = [f"{prefix}{start + i}" for i in range(len(part))]
        pq.write_table(pa.table({"doc_id": ids, "text": part}), f"{folder}/part-{f:05d}.parquet",
                       row_group_size=100)
    return f"{folder}/*.parquet"


def make_texts(tokenizer, n: int, args, seed: int) -> tuple[list[str], np.ndarray]:
    lengths = ec.lognormal_lengths(n, args.median, args.sigma, args.cap, seed)
    return ec.TextMaker(tokenizer, seed).texts(np.maximum(lengths - 1, 1)), lengths


# ---------------------------------------------------------------- the job and the peer

def job_config(paths: str, model: str, out: str, args) -> dict:
    return {"input": {"paths": [paths], "id_column": "doc_id"},
            "model": {"path": model, "max_length": args.cap, "max_batch_tokens": args.max_batch_tokens},
            "output": {"path": out},
            "compute": {"batch_rows": args.batch_rows, "num_cpus": args.replica_cpus},
            "run": {"progress_interval_s": 3600}}


def run_job(paths: str, model: str, out: str, args) -> tuple[float, int]:
    from pipelines.embed.config import EmbedJobConfig
    from pipelines.embed.job import run_embed

    cfg = EmbedJobConfig.model_validate(job_config(paths, model, out, args))
    started = time.perf_counter()
    summary = run_embed(cfg, stream=io.StringIO())
    return time.perf_counter() - started, int(summary["totals"]["rows"])


class CardEmbedder:
    """The Ray Data docs' callable-class pattern around the model card recipe (`embed_common.Card`)."""

    def __init__(self, path: str, max_length: int, batch: int, threads: int):
        import torch

        from benchmarks.embed_common import Card

        torch.set_num_threads(threads)  # what Ray's OMP_NUM_THREADS=num_cpus gives it anyway
        self.card = Card(path, max_length, device="cpu", dtype=torch.float32, batch=batch)

    def __call__(self, batch: dict) -> dict:
        return {"doc_id": batch["doc_id"], "embedding": self.card.embed(list(batch["text"]))}


def run_peer(paths: str, model: str, out: str, args) -> tuple[float, int]:
    import ray.data

    started = time.perf_counter()
    ds = ray.data.read_parquet(sorted(glob.glob(paths)))
    ds = ds.map_batches(CardEmbedder, batch_size=args.batch, compute=ray.data.ActorPoolStrategy(size=1),
                        num_cpus=args.replica_cpus,
                        fn_constructor_kwargs={"path": model, "max_length": args.cap, "batch": args.batch,
                                               "threads": max(1, int(args.replica_cpus))})
    ds.write_parquet(out)
    elapsed = time.perf_counter() - started
    return elapsed, sum(pq.ParquetFile(f).metadata.num_rows for f in glob.glob(f"{out}/*.parquet"))


def _vectors(table: pa.Table, id_col: str) -> dict[str, np.ndarray]:
    col = table.column("embedding").combine_chunks()
    try:
        vecs = np.asarray(col.to_numpy(zero_copy_only=False))
        if vecs.dtype == object:
            vecs = np.stack(vecs)
    except (NotImplementedError, pa.ArrowException, TypeError, ValueError):
        vecs = np.asarray(col.to_pylist(), dtype=np.float32)
    return dict(zip(table.column(id_col).to_pylist(), vecs.reshape(len(table), -1)))


def max_cos_delta_outputs(job_out: str, peer_out: str) -> float:
    """Largest 1 − cosine between our committed vectors and the peer's, matched on id."""
    try:
        ours = _vectors(pa.concat_tables(pq.read_table(f, columns=["id", "embedding"]) for f in
                                         glob.glob(f"{job_out}/data/**/*.parquet", recursive=True)), "id")
        peer = _vectors(pa.concat_tables(pq.read_table(f, columns=["doc_id", "embedding"]) for f in
                                         glob.glob(f"{peer_out}/*.parquet")), "doc_id")
        keys = sorted(ours)
        if set(keys) != set(peer):
            return float("nan")
        return ec.max_cos_delta(np.stack([ours[k] for k in keys]), np.stack([peer[k] for k in keys]))
    except Exception:  # noqa: BLE001 - a check, not the measurement
        return float("nan")


# ---------------------------------------------------------------- memory

def _psutil():
    try:
        import psutil
    except ImportError:  # Ray vendors one and puts it on sys.path once imported
        import ray  # noqa: F401
        import psutil
    return psutil


class PeakRSS:
    """Samples, every `interval` s on a thread, the RSS summed over this process and every process under its
    raylet (Ray's workers, actors and agents); `peak` is the largest sum seen, `base` the sum at start, and
    `roles` each process role's RSS (summed over its processes) at the moment of the peak."""

    def __init__(self, interval: float = 0.2):
        psutil = _psutil()
        self.psutil, self.interval = psutil, interval
        self.me = psutil.Process()
        raylets = [c for c in self.me.children() if "raylet" in self._name(c)]
        if not raylets:
            raise RuntimeError("no raylet under this process: start a local Ray from this driver first")
        self.raylet = raylets[0]
        self.peak = self.base = 0
        self.roles: dict[str, int] = {}
        self.base_roles: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _name(self, p) -> str:
        try:
            return p.name()
        except self.psutil.Error:
            return ""

    def _role(self, p) -> str:
        if p.pid == self.me.pid:
            return "driver"
        try:
            title = " ".join(p.cmdline()) or p.name()
        except self.psutil.Error:
            return "?"
        if title.startswith("ray::"):
            return title.split()[0].split("(")[0] + ("(EmbedReplica)" if "EmbedReplica" in title else "")
        return p.name()

    def by_role(self) -> dict[str, int]:
        try:
            procs = [self.me] + self.raylet.children(recursive=True)
        except self.psutil.Error:
            procs = [self.me]
        roles: dict[str, int] = {}
        for p in procs:
            try:
                rss = p.memory_info().rss
            except self.psutil.Error:
                continue
            role = self._role(p)
            roles[role] = roles.get(role, 0) + rss
        return roles

    def total(self) -> int:
        return sum(self.by_role().values())

    def _sample(self) -> None:
        roles = self.by_role()
        total = sum(roles.values())
        if total > self.peak:
            self.peak, self.roles = total, roles
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.base_roles = self.by_role()
        self.base = self.peak = sum(self.base_roles.values())
        self.roles = dict(self.base_roles)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def growth(self, top: int = 4) -> str:
        """The roles that grew most from start to peak, in MiB."""
        keys = set(self.roles) | set(self.base_roles)
        grew = sorted(((self.roles.get(k, 0) - self.base_roles.get(k, 0)) / 2**20, k) for k in keys)[::-1]
        return ", ".join(f"{k} {d:+,.0f}" for d, k in grew[:top])


# ---------------------------------------------------------------- the comparisons

def fmt_ratio(ratios: list[float]) -> str:
    med = statistics.median(ratios)
    return f"{med:.2f}× ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else f"{med:.2f}×"


def speed_rows(args, tmp: str, model: str, model_label: str) -> list[tuple]:
    from actors.loading import load_tokenizer

    texts, lengths = make_texts(load_tokenizer(model), args.docs, args, args.seed)
    per_file = -(-args.docs // args.shards)
    paths = write_corpus(f"{tmp}/corpus", texts, per_file)
    first = sorted(glob.glob(paths))[0]
    n = len(texts)

    started = time.perf_counter()
    bare = ec.Ours(model, args.cap, device="cpu", dtype="float32", max_batch_tokens=args.max_batch_tokens,
                   batch_rows=args.batch_rows, num_threads=max(1, int(args.replica_cpus)))
    load_s = time.perf_counter() - started
    real = np.diff(bare.encode_ids(texts)[1])
    print(f"corpus: {n} docs in {args.shards} Parquet files, {int(real.sum()):,} tokens (median "
          f"{int(np.median(real))}, p90 {int(np.percentile(real, 90))}, max {int(real.max())}); model {model_label}; "
          f"replica {args.replica_cpus:g} CPU(s) = {max(1, int(args.replica_cpus))} torch thread(s); bare replica "
          f"model load {load_s:.1f}s (untimed)", flush=True)
    bare.embed(texts[:8])
    warm_job, _ = run_job(first, model, f"{tmp}/out/warm-job", args)
    warm_peer, _ = run_peer(first, model, f"{tmp}/out/warm-peer", args)
    print(f"  warm-up on 1 of {args.shards} files (untimed): job {warm_job:.1f}s, peer {warm_peer:.1f}s", flush=True)

    times: dict[str, list[float]] = {"job": [], "bare": [], "peer": []}
    names = list(times)
    for r in range(args.repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            if name == "job":
                elapsed, rows = run_job(paths, model, f"{tmp}/out/job-{r}", args)
            elif name == "peer":
                elapsed, rows = run_peer(paths, model, f"{tmp}/out/peer-{r}", args)
            else:
                started = time.perf_counter()
                rows = len(bare.embed(texts))
                elapsed = time.perf_counter() - started
            if rows != n:
                raise RuntimeError(f"{name} wrote {rows} rows, expected {n}")
            times[name].append(elapsed)
            print(f"  round {r + 1}: {name} {elapsed:.2f}s", flush=True)
    delta = max_cos_delta_outputs(f"{tmp}/out/job-0", f"{tmp}/out/peer-0")
    job_rate, bare_rate, peer_rate = (n / statistics.median(times[k]) for k in names)
    r3 = [b / j for j, b in zip(times["job"], times["bare"])]
    r4 = [p / j for j, p in zip(times["job"], times["peer"])]
    job_med = statistics.median(times["job"])
    return [
        ("E3", "full embed job (local Ray, Parquet, commit) vs bare replica in-process", f"{job_rate:.2f}",
         f"{bare_rate:.2f}", r3, "E3",
         f"job times include actor start + model load (in-process load {load_s:.1f}s); warm-up run excluded; "
         f"w/o load {n / max(job_med - load_s, 1e-9) / bare_rate:.2f}×"),
        ("E4", "full embed job vs Ray Data pattern (read_parquet→map_batches card→write)", f"{job_rate:.2f}",
         f"{peer_rate:.2f}", r4, "E4", f"both include actor start + model load; 1−cos vs peer {delta:.0e}"),
    ]


def memory_row(args, tmp: str, model: str) -> tuple:
    from actors.loading import load_tokenizer

    big = args.mem_docs * 10
    texts, _ = make_texts(load_tokenizer(model), big, args, args.seed + 7)
    small_paths = write_corpus(f"{tmp}/mem-1x", texts[: args.mem_docs], args.mem_rows_per_file)
    big_paths = write_corpus(f"{tmp}/mem-10x", texts, args.mem_rows_per_file)
    print(f"memory corpus: {args.mem_docs} docs in {len(glob.glob(small_paths))} files vs {big} in "
          f"{len(glob.glob(big_paths))} ({args.mem_rows_per_file} rows per file and work item); tiny model", flush=True)
    run_job(sorted(glob.glob(small_paths))[0], model, f"{tmp}/out/mem-warm", args)
    peaks: dict[str, list[int]] = {"1x": [], "10x": []}
    bases: dict[str, list[int]] = {"1x": [], "10x": []}
    order = [("1x", small_paths, args.mem_docs), ("10x", big_paths, big)]
    for r in range(args.mem_repeats):
        for name, paths, n in (order if r % 2 == 0 else order[::-1]):
            with PeakRSS() as mem:
                elapsed, rows = run_job(paths, model, f"{tmp}/out/mem-{name}-{r}", args)
            if rows != n:
                raise RuntimeError(f"memory run {name} wrote {rows} rows, expected {n}")
            peaks[name].append(mem.peak)
            bases[name].append(mem.base)
            print(f"  round {r + 1}: {name} {elapsed:.1f}s, RSS sum {mem.base / 2**20:,.0f} MiB at start, peak "
                  f"{mem.peak / 2**20:,.0f} MiB ({mem.samples} samples); grew: {mem.growth()}", flush=True)
    ratios = [b / s for s, b in zip(peaks["1x"], peaks["10x"])]
    grow = {k: statistics.median(p - b for p, b in zip(peaks[k], bases[k])) / 2**20 for k in peaks}
    mib = {k: statistics.median(v) / 2**20 for k, v in peaks.items()}
    return ("E7", f"peak RSS (driver + Ray workers) of the job, {big} vs {args.mem_docs} docs (tiny model)",
            f"{mib['10x']:,.0f}", f"{mib['1x']:,.0f}", ratios, "E7",
            f"MiB, 10× vs 1×; rise above start {grow['10x']:,.0f} vs {grow['1x']:,.0f} MiB")


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, small corpora, one round")
    p.add_argument("--model", choices=["realistic", "tiny"], default=None,
                   help="model of E3/E4 (default realistic; --quick tiny); E7 always uses the tiny one")
    p.add_argument("--docs", type=int, default=None, help="E3/E4 documents (default 120; --quick 96)")
    p.add_argument("--shards", type=int, default=4, help="E3/E4 Parquet files (one work item each)")
    p.add_argument("--median", type=float, default=200)
    p.add_argument("--sigma", type=float, default=1.2)
    p.add_argument("--cap", type=int, default=None, help="max tokens per document (default 1024; --quick 512)")
    p.add_argument("--repeats", type=int, default=None, help="E3/E4 rounds (default 2; --quick 1)")
    p.add_argument("--mem-docs", type=int, default=None, help="E7 1× corpus (default 1000; --quick 200); 10× this")
    p.add_argument("--mem-rows-per-file", type=int, default=None, help="E7 rows per file (default 250; --quick 50)")
    p.add_argument("--mem-repeats", type=int, default=None, help="E7 rounds (default 2; --quick 1)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the Ray Data pattern's card recipe")
    p.add_argument("--batch-rows", type=int, default=256, help="our compute.batch_rows (pipeline default)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="our model.max_batch_tokens (default)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus of our replica and the peer's actor")
    p.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of the local Ray")
    p.add_argument("--skip", nargs="*", default=[], choices=["E3E4", "E7"], help="comparisons to leave out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    q = args.quick
    args.model = args.model or ("tiny" if q else "realistic")
    args.docs = args.docs or (96 if q else 120)
    args.cap = args.cap or (512 if q else 1024)
    args.repeats = args.repeats or (1 if q else 2)
    args.mem_docs = args.mem_docs or (200 if q else 1000)
    args.mem_rows_per_file = args.mem_rows_per_file or (50 if q else 250)
    args.mem_repeats = args.mem_repeats or (1 if q else 2)
    if args.replica_cpus > args.ray_cpus - 1:
        p.error(f"--replica-cpus {args.replica_cpus:g} must leave a CPU of the {args.ray_cpus} for the read and "
                "write tasks (Ray Data's default read/write tasks take 1 CPU), or the pipelines stall")

    ec.quiet()
    warnings.filterwarnings("ignore")
    import ray

    from actors.random_qwen import build_random_qwen3
    from pipelines.ray_quiet import quiet_ray_data

    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="embedrank-pipeline-bench-")
    try:
        tiny = str(build_random_qwen3(f"{tmp}/tiny", kind="embedding"))
        model, label = tiny, "tiny random Qwen3 (hidden 64), fp32"
        if args.model == "realistic" and "E3E4" not in args.skip:
            model = str(build_random_qwen3(f"{tmp}/realistic", kind="embedding", **REALISTIC))
            label = "random Qwen3 hidden 1024 × 2 layers, fp32"
        ray_started = time.monotonic()
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        quiet_ray_data()
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        print(f"ray {ray.__version__}: local, {args.ray_cpus} CPUs, started in {time.monotonic() - ray_started:.1f}s "
              f"(not timed); ratio = median over rounds (min–max)", flush=True)
        rows = []
        if "E7" not in args.skip:
            rows.append(memory_row(args, tmp, tiny))
        if "E3E4" not in args.skip:
            rows[:0] = speed_rows(args, tmp, model, label)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"{'':<3} {'comparison':<76} {'ours':>8} {'peer':>8} {'ratio':>20} {'goal':>7} met  note")
    for key, what, ours, peer, ratios, goal_key, note in rows:
        goal, sense = GOALS[goal_key]
        value = statistics.median(ratios)
        met = "yes" if (value >= goal if sense == ">=" else value <= goal) else "NO"
        goal_s = f"{'≥' if sense == '>=' else '≤'}{goal:g}×"
        print(f"{key:<3} {what:<76} {ours:>8} {peer:>8} {fmt_ratio(ratios):>20} {goal_s:>7} {met:<4} {note}")
    print(f"\nunits: docs/s (E3, E4; peer = bare replica in E3), MiB (E7: ours = 10× corpus, peer = 1×); "
          f"total {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
