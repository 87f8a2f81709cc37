"""Several vector columns from one forward pass: what three outputs cost against one, and what they store.

    python -m benchmarks.vector_columns [--docs 600] [--repeats 2]

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
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=600)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--calibration-rows", type=int, default=200)
    args = p.parse_args()
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
    three = [{"column": "embedding_f16", "dtype": "float16"},
             {"column": "embedding_i8", "dimensions": 256, "dtype": "int8"},
             {"column": "embedding_bits", "dtype": "ubinary"}]
    given = [{**v, "ranges": ranges} if v["dtype"] == "int8" else v for v in three]
    runs = {"one": None, "three": given, "three+calibration": three}
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
    text = "\n".join(lines)
    print(text)
    path = os.path.join(os.path.dirname(__file__), "results", f"cpu-vector-columns-{dt.date.today()}.txt")
    with open(path, "w") as fh:
        fh.write(text + "\n\ncommand: python -m benchmarks.vector_columns " +
                 f"--docs {args.docs} --repeats {args.repeats} --calibration-rows {args.calibration_rows}\n")


if __name__ == "__main__":
    main()
