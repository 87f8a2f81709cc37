"""sentence-transformers' `encode` as a plain script: Parquet in, Parquet out, every core.

    python -m benchmarks.st_encode --model DIR --input 'corpus/*.parquet' --output OUT [--batch 32]

The peer of E9 (`benchmarks/e9.py`): what a newcomer who knows sentence-transformers would run instead of
embedrank. The model directory carries the files the Qwen3-Embedding hub repos ship for it (last-token pooling,
then Normalize: `embed_common.write_sentence_transformers_files`), so `SentenceTransformer(DIR)` is the hub
model's own setup. `encode` sorts the texts by length and embeds them in batches of `--batch` (its default, 32);
documents get no prompt, as the card's. torch runs on every core (`torch.set_num_threads(os.cpu_count())`).
Prints one JSON line: its phases (imports, model load, read, embed, write) and rows, as `card_recipe` does.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

STARTED = time.perf_counter()

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory with sentence-transformers files")
    parser.add_argument("--input", required=True, help="glob of Parquet files")
    parser.add_argument("--output", required=True, help="output folder (gets part-0.parquet)")
    parser.add_argument("--id-column", default="doc_id")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--batch", type=int, default=32, help="encode's batch_size")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    args = parser.parse_args(argv)
    phases = {"imports_s": time.perf_counter() - STARTED}

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model = SentenceTransformer(args.model, device="cpu")
    phases["model_load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    table = pa.concat_tables(pq.read_table(f, columns=[args.id_column, args.text_column])
                             for f in sorted(glob.glob(args.input)))
    ids, texts = table.column(args.id_column).to_pylist(), table.column(args.text_column).to_pylist()
    phases["read_s"] = time.perf_counter() - t

    t = time.perf_counter()
    matrix = model.encode(texts, batch_size=args.batch, show_progress_bar=False, convert_to_numpy=True)
    phases["embed_s"] = time.perf_counter() - t

    t = time.perf_counter()
    os.makedirs(args.output, exist_ok=True)
    flat = pa.array(matrix.astype("float32").reshape(-1), pa.float32())
    pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])}),
                   os.path.join(args.output, "part-0.parquet"))
    phases["write_s"] = time.perf_counter() - t
    phases["total_s"] = time.perf_counter() - STARTED
    print(json.dumps({"rows": len(ids), "threads": args.threads,
                      **{k: round(v, 3) for k, v in phases.items()}}), flush=True)


if __name__ == "__main__":
    main()
