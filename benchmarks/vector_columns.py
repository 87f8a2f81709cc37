"""Several vector columns from one forward pass: what three outputs cost against one, and what they store.

    python -m benchmarks.vector_columns [--docs 600] [--repeats 2]
    python -m benchmarks.vector_columns --stages [--docs 600] [--repeats 7]     # ~9 min on 2 shared cores

One local Ray, one random-weight Qwen3 (hidden 1024, 2 layers, fp32, the real Qwen tokenizer), one corpus of
real English words (lengths 8-120 words). Interleaved repeats of three `embedrank embed` runs into fresh outputs:

- one: today's single `embedding` (float32, 1024);
- three: float16 1024 + int8 256 + ubinary 1024, the int8 ranges given (the steady state: a resume or a
  reindex version reuses recorded ranges);
- three+calibration: the same, the int8 ranges calibrated on the plan's first `--calibration-rows` documents
  (a first run: one more pass over that sample, and a replica start).

Prints the wall-time ratios (goal: three ≤ 1.03 × one on CPU), the bytes per row of each column (Arrow and as
stored in Parquet) with the projection to 10⁹ rows, and a retrieval check: for the first 50 documents as
queries, the overlap of the int8 (dot product) and ubinary (hamming) top-10 with the float column's top-10 (at
the same width and at 1024): it shows that the quantisation is wired right, not how a real model ranks.
Writes benchmarks/results/cpu-vector-columns-<date>.txt.

Whole jobs on a small shared machine vary by tens of percent run to run, far more than the 3% goal, so
`--stages` measures instead, in one process, exactly the work that three columns add or change, on the same
model and corpus: the replica (`EmbedReplica`, the settings the job's config builds, torch threads as a
replica sets them) called on identical tokenized batches for one and for three columns, and the write stage's
Parquet encoding of each output piece (`pipelines.output.pieces._parquet_bytes`, the replica's batch as one
piece), interleaved batch by batch (the order alternating), many repeats, medians and the spread of the
per-repeat ratios. The replica's time is split into its forward pass (`Embedder.stats.forward_s`: the same
computation for both, so the spread of its ratio is the machine's noise) and the rest (reading the ids, building
the columns); the rest plus the write is the work that differs, and its extra as a share of one's replica + write
estimates three/one without the forward pass's noise. The column building alone (`vectors_to_arrow` against
`vector_columns` on the same pooled vectors) is timed too. Writes
benchmarks/results/cpu-vector-columns-stages-<date>.txt.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will more can out who "
         "them some could time these two may then do first any my now such like our over man me even most made "
         "after also did many before must through back years where much your way well down should because each "
         "just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might us great old year off come "
         "since against go came right used take three river city music science water history language market "
         "school garden winter summer engine letter doctor island mountain bridge window dinner station").split()


def corpus(folder: str, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 120)))) for _ in range(n)]
    os.makedirs(folder)
    pq.write_table(pa.table({"doc_id": [f"d{i:06d}" for i in range(n)], "text": texts}),
                   f"{folder}/corpus.parquet", row_group_size=100)
    return f"{folder}/*.parquet"


def config(paths: str, out: str, model: str, vectors, calibration_rows: int):
    from pipelines.embed.config import EmbedJobConfig

    output = {"path": out} if vectors is None else {"path": out, "vectors": vectors,
                                                     "calibration_rows": calibration_rows}
    return EmbedJobConfig.model_validate({
        "input": {"paths": [paths], "id_column": "doc_id", "rows_per_item": 100},
        "model": {"path": model, "max_length": 256, "max_batch_tokens": 4096},
        "compute": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1, "batch_rows": 64},
        "output": output, "run": {"progress_interval_s": 600}})


def column_bytes(out: str) -> dict[str, int]:
    """Compressed Parquet bytes per column over the output's data files."""
    total: dict[str, int] = {}
    for folder, _, files in os.walk(f"{out}/data"):
        for f in files:
            meta = pq.ParquetFile(f"{folder}/{f}").metadata
            for rg in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    col = meta.row_group(rg).column(c)
                    name = col.path_in_schema.split(".")[0]
                    total[name] = total.get(name, 0) + col.total_compressed_size
    return total


def matrix(table: pa.Table, column: str) -> np.ndarray:
    c = table.column(column).combine_chunks()
    return c.values.to_numpy(zero_copy_only=False).reshape(len(c), -1)


def top10(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))


THREE = [{"column": "embedding_f16", "dtype": "float16"},
         {"column": "embedding_i8", "dimensions": 256, "dtype": "int8"},
         {"column": "embedding_bits", "dtype": "ubinary"}]
"""The three outputs of the issue: float16 1024, int8 256, packed bits 1024."""


def with_ranges(vectors: list[dict], ranges: list[list[float]]) -> list[dict]:
    """`vectors` with the int8 column's calibration ranges given, as a resumed run or a reindex version has them."""
    return [{**v, "ranges": ranges} if v["dtype"] == "int8" else v for v in vectors]


def summary(one: list[float], three: list[float]) -> dict[str, float]:
    """Medians of the per-repeat totals, the ratio of the medians, and the per-repeat ratios' median, quartiles
    and range."""
    ratios = np.asarray(three) / np.asarray(one)
    q1, q3 = np.percentile(ratios, [25, 75])
    return {"one": float(np.median(one)), "three": float(np.median(three)),
            "ratio": float(np.median(three) / np.median(one)), "ratio_median": float(np.median(ratios)),
            "q1": float(q1), "q3": float(q3), "min": float(ratios.min()), "max": float(ratios.max())}


def summary_line(label: str, s: dict[str, float], unit: float = 1.0, fmt: str = "{:.3f} s") -> str:
    return (f"  {label:<16} one {fmt.format(s['one'] * unit)}  three {fmt.format(s['three'] * unit)}  "
            f"three/one per repeat: median {s['ratio_median']:.4f}, IQR {s['q1']:.4f}-{s['q3']:.4f}, "
            f"range {s['min']:.4f}-{s['max']:.4f} (ratio of the medians {s['ratio']:.4f})")


def stages(args) -> None:
    """The `--stages` measurement (see the module docstring)."""
    import torch

    from actors.embedder import EmbedReplica, vectors_to_arrow
    from actors.quantize import calibration_ranges, vector_columns
    from actors.random_qwen import build_random_qwen3
    from actors.tokenize import TextTokenizer, TokenizeBatch
    from common.columns import EMBEDDING, REJECT
    from pipelines.embed.graph import output_base
    from pipelines.output.pieces import _parquet_bytes

    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="bench-vector-stages-")
    model = str(build_random_qwen3(f"{tmp}/model", kind="embedding", hidden_size=1024, num_layers=2, num_heads=16,
                                   num_kv_heads=8))
    paths = corpus(f"{tmp}/corpus", args.docs)
    corpus_table = pq.read_table(f"{tmp}/corpus/corpus.parquet")
    cfg_one = config(paths, f"{tmp}/out", model, None, 0)
    tokenize = TokenizeBatch(TextTokenizer(model, None, cfg_one.model.max_length, cfg_one.model.instruction))
    rows = cfg_one.compute.batch_rows  # what the job hands a replica per call
    batches = []
    for lo in range(0, corpus_table.num_rows, rows):  # tokenized once: both replicas get these very tables
        part = corpus_table.slice(lo, rows).rename_columns(["id", "text"])
        batches.append(tokenize(part.append_column(REJECT, pa.nulls(part.num_rows, pa.string()))))

    one = EmbedReplica(cfg_one.replica_settings(None))
    sample = -(-args.calibration_rows // rows)
    ranges = calibration_ranges(np.vstack([matrix(one(b), EMBEDDING) for b in batches[:sample]]),
                                256).tolist()  # also one's warm-up
    cfg_three = config(paths, f"{tmp}/out", model, with_ranges(THREE, ranges), args.calibration_rows)
    three = EmbedReplica(cfg_three.replica_settings(None))
    replicas = {"one": one, "three": three}
    columns = {"one": output_base(cfg_one), "three": output_base(cfg_three)}
    fingerprint = json.dumps({"config": cfg_three.model_dump(mode="json")}, sort_keys=True)  # a job's size
    threads = torch.get_num_threads()  # as the replicas set it (`placement`: the settings' num_threads)

    def run(name: str, batch: pa.Table) -> tuple[pa.Table, float, float, float, int]:
        """The replica's output, its time, the forward pass's share of it, the piece encoding's time, bytes."""
        forward_before = replicas[name].embedder.stats.forward_s
        started = time.perf_counter()
        out = replicas[name](batch)
        replica_done = time.perf_counter()
        data = _parquet_bytes(out.select(columns[name]), fingerprint)
        done = time.perf_counter()
        forward = replicas[name].embedder.stats.forward_s - forward_before
        return out, replica_done - started, forward, done - replica_done, len(data)

    for b in batches[:2]:  # warm-up, untimed: three's first calls, both encoders
        run("three", b)
        run("one", b)
    times = {k: {"replica": [], "forward": [], "write": []} for k in replicas}
    stored = {k: 0 for k in replicas}
    pooled, halves = [], []
    for r in range(args.repeats):
        totals = {k: {"replica": 0.0, "forward": 0.0, "write": 0.0} for k in replicas}
        for i, b in enumerate(batches):
            for name in (("one", "three") if (r + i) % 2 == 0 else ("three", "one")):
                out, rt, ft, wt, size = run(name, b)
                totals[name]["replica"] += rt
                totals[name]["forward"] += ft
                totals[name]["write"] += wt
                if r == 0:
                    stored[name] += size
                    (pooled if name == "one" else halves).append(
                        matrix(out, EMBEDDING if name == "one" else "embedding_f16"))
        for k in replicas:
            for part, t in totals[k].items():
                times[k][part].append(t)
    same = float(np.abs(np.vstack(pooled) - np.vstack(halves).astype(np.float32)).max())

    specs = three.vectors  # the replica's own specs (widths filled in)
    build = {"one": [], "three": []}
    for r in range(args.repeats):
        totals = {"one": 0.0, "three": 0.0}
        for i, p in enumerate(pooled):
            for name in (("one", "three") if (r + i) % 2 == 0 else ("three", "one")):
                started = time.perf_counter()
                if name == "one":
                    vectors_to_arrow(p, "float32")
                else:
                    vector_columns(p, specs)
                totals[name] += time.perf_counter() - started
        for k in totals:
            build[k].append(totals[k])
    load_after = os.getloadavg()

    def per(part):
        if part == "rest":
            return {k: [a - b for a, b in zip(times[k]["replica"], times[k]["forward"])] for k in replicas}
        if part == "both":
            return {k: [a + b for a, b in zip(times[k]["replica"], times[k]["write"])] for k in replicas}
        if part == "extra":
            return {k: [a - b + c for a, b, c in zip(times[k]["replica"], times[k]["forward"], times[k]["write"])]
                    for k in replicas}
        return {k: times[k][part] for k in replicas}

    s = {part: summary(per(part)["one"], per(part)["three"])
         for part in ("replica", "forward", "rest", "write", "both", "extra")}
    s_build = summary(build["one"], build["three"])
    extra = (s["extra"]["three"] - s["extra"]["one"]) / s["both"]["one"]
    n = corpus_table.num_rows
    lines = [f"vector columns, stage work in one process, {dt.date.today()}: {n} docs in {len(batches)} batches of "
             f"{rows} rows, random Qwen3 hidden 1024 x 2 layers fp32 (padded batches), real Qwen tokenizer, "
             f"torch threads {threads}, {os.cpu_count()} cores (shared)",
             "one: the single float32 1024 `embedding`; three: float16 1024 + int8 256 (ranges given, as on a "
             "resume) + ubinary 1024",
             f"{args.repeats} repeats over the same tokenized batches, one and three interleaved batch by batch "
             "(order alternating), after an untimed warm-up; times are per repeat (all batches), medians; three/one: "
             "the per-repeat (paired) ratios' median, IQR and range, then the ratio of the medians",
             f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; "
             f"after {', '.join(f'{x:.2f}' for x in load_after)}",
             f"same forward pass: largest |float16 column - float32 embedding| = {same:.2e}",
             "",
             summary_line("replica", s["replica"]),
             summary_line("  its forward", s["forward"]),
             summary_line("  the rest", s["rest"]),
             summary_line("write (encode)", s["write"]),
             summary_line("replica + write", s["both"]),
             "",
             "per repeat (s), replica + write:",
             "  one   " + " ".join(f"{t:.3f}" for t in per("both")["one"]),
             "  three " + " ".join(f"{t:.3f}" for t in per("both")["three"]),
             "",
             "the work that differs (replica outside its forward pass, plus write), and the column building alone "
             "on the same pooled vectors (vectors_to_arrow float32 vs vector_columns x3):",
             summary_line("differing work", s["extra"], 1000, "{:.1f} ms"),
             summary_line("columns", s_build, 1000, "{:.2f} ms"),
             f"  three's extra differing work as a share of one's replica + write: {100 * extra:+.2f}% "
             f"(an estimate of three/one without the forward pass's noise: {1 + extra:.4f})",
             "",
             f"Parquet bytes per row written: one {stored['one'] / n:.1f}, three {stored['three'] / n:.1f}",
             "",
             f"goal: three <= 1.03 x one. replica + write, measured per repeat: median {s['both']['ratio_median']:.4f} "
             f"(IQR {s['both']['q1']:.4f}-{s['both']['q3']:.4f}, range {s['both']['min']:.4f}-{s['both']['max']:.4f}; "
             f"{'met' if s['both']['ratio_median'] <= 1.03 else 'NOT met'} by the median, "
             f"{'the whole range within' if s['both']['max'] <= 1.03 else 'the range reaching past'} the goal: the "
             "forward pass is the same work in both, so its spread is noise); from the differing work: "
             f"{1 + extra:.4f} ({'met' if extra <= 0.03 else 'NOT met'})"]
    _write_results(lines, args, "-stages", "--stages ")


def _write_results(lines: list[str], args, suffix: str, flag: str) -> None:
    """Print the report and write it, with the command that reproduces it, to benchmarks/results/."""
    text = "\n".join(lines)
    print(text)
    path = os.path.join(os.path.dirname(__file__), "results", f"cpu-vector-columns{suffix}-{dt.date.today()}.txt")
    with open(path, "w") as fh:
        fh.write(text + f"\n\ncommand: python -m benchmarks.vector_columns {flag}"
                 f"--docs {args.docs} --repeats {args.repeats} --calibration-rows {args.calibration_rows}\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=600)
    p.add_argument("--repeats", type=int, default=None, help="job runs: 2; --stages: 7")
    p.add_argument("--calibration-rows", type=int, default=200)
    p.add_argument("--stages", action="store_true",
                   help="time the replica and the piece encoding in one process instead of whole jobs")
    args = p.parse_args()
    if args.stages:
        args.repeats = args.repeats or 7
        stages(args)
        return
    args.repeats = args.repeats or 2
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from actors.quantize import calibration_ranges
    from actors.random_qwen import build_random_qwen3
    from pipelines.embed.job import run_embed
    from pipelines.output.reader import read_committed

    tmp = tempfile.mkdtemp(prefix="bench-vectors-")
    model = str(build_random_qwen3(f"{tmp}/model", kind="embedding", hidden_size=1024, num_layers=2, num_heads=16,
                                   num_kv_heads=8))
    paths = corpus(f"{tmp}/corpus", args.docs)
    warm = f"{tmp}/warm"
    run_embed(config(paths, warm, model, None, 0), stream=io.StringIO())  # Ray up, caches warm (untimed)
    floats = matrix(read_committed(warm).sort_by("id"), "embedding")
    ranges = calibration_ranges(floats[: args.calibration_rows], 256).tolist()
    runs = {"one": None, "three": with_ranges(THREE, ranges), "three+calibration": THREE}
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs: dict[str, str] = {}
    for r in range(args.repeats):
        for name, vectors in runs.items():
            out = f"{tmp}/{name}-{r}"
            started = time.monotonic()
            run_embed(config(paths, out, model, vectors, args.calibration_rows), stream=io.StringIO())
            times[name].append(time.monotonic() - started)
            outs[name] = out

    lines = [f"vector columns, {dt.date.today()}: {args.docs} docs, random Qwen3 hidden 1024 x 2 layers fp32, "
             f"1 CPU replica, {os.cpu_count()} cores (shared), {args.repeats} interleaved repeats",
             "", "wall time per run (s):"]
    for name, ts in times.items():
        lines.append(f"  {name:<18} " + " ".join(f"{t:.1f}" for t in ts) + f"  median {np.median(ts):.1f}")
    one = float(np.median(times["one"]))
    for name in ("three", "three+calibration"):
        lines.append(f"  ratio {name} / one: {np.median(times[name]) / one:.3f} "
                     f"(per repeat: {', '.join(f'{b / a:.3f}' for a, b in zip(times['one'], times[name]))})")

    rows = args.docs
    stored = {**column_bytes(outs["one"]), **column_bytes(outs["three"])}
    table = read_committed(outs["three"]).sort_by("id")
    lines += ["", "bytes per row (Arrow = values; Parquet = as stored, zstd) and 10^9 rows:"]
    for col, dtype, dims in (("embedding", "float32", 1024), ("embedding_f16", "float16", 1024),
                             ("embedding_i8", "int8", 256), ("embedding_bits", "ubinary", 1024)):
        arrow = {"float32": 4 * dims, "float16": 2 * dims, "int8": dims, "ubinary": dims // 8}[dtype]
        per = stored[col] / rows
        lines.append(f"  {col:<15} {dtype:<8} {dims:>5}d  Arrow {arrow:>5} B  Parquet {per:8.1f} B  "
                     f"-> 10^9 rows: {arrow * 1e9 / 1e12:6.3f} TB (Arrow), {per * 1e9 / 1e12:6.3f} TB (Parquet)")
    for dtype, dims, b in (("int8", 1024, 1024), ("binary", 1024, 128)):
        lines.append(f"  (for comparison) {dtype} {dims}d: {b} B/row -> {b * 1e9 / 1e12:.3f} TB at 10^9 rows")

    f32 = floats
    q = matrix(table, "embedding_i8").astype(np.float32)
    bits = np.unpackbits(matrix(table, "embedding_bits"), axis=1).astype(np.float32)
    head = f32[:, :256] / np.linalg.norm(f32[:, :256], axis=1, keepdims=True)
    queries = np.arange(min(50, rows))
    ref_full, ref_256 = top10(f32[queries] @ f32.T), top10(head[queries] @ head.T)
    hamming = -(bits[queries] @ (1 - bits).T + (1 - bits[queries]) @ bits.T)
    lines += ["", f"retrieval check ({len(queries)} documents as queries, top-10 overlap with the float column's; "
              "random model: wiring, not quality):",
              f"  int8 256 (dot)        vs float32 256: {overlap(top10(q[queries] @ q.T), ref_256):.3f}",
              f"  int8 256 (dot)        vs float32 1024: {overlap(top10(q[queries] @ q.T), ref_full):.3f}",
              f"  ubinary 1024 (hamming) vs float32 1024: {overlap(top10(hamming), ref_full):.3f}",
              f"  float16 1024 (dot)    vs float32 1024: "
              f"{overlap(top10(matrix(table, 'embedding_f16').astype(np.float32)[queries] @ f32.T), ref_full):.3f}"]
    _write_results(lines, args, "", "")


if __name__ == "__main__":
    main()
