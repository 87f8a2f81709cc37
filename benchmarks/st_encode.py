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

import time

STARTED = time.perf_counter()

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from benchmarks import peer_io  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    args = peer_io.arguments(__doc__.splitlines()[0], argv)
    phases = {"imports_s": time.perf_counter() - STARTED}

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model = SentenceTransformer(args.model, device="cpu")
    phases["model_load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ids, texts = peer_io.read_texts(args)
    phases["read_s"] = time.perf_counter() - t

    t = time.perf_counter()
    matrix = model.encode(texts, batch_size=args.batch, show_progress_bar=False, convert_to_numpy=True)
    phases["embed_s"] = time.perf_counter() - t

    t = time.perf_counter()
    peer_io.write_vectors(args, ids, matrix)
    phases["write_s"] = time.perf_counter() - t
    peer_io.report(phases, STARTED, len(ids), args.threads)


if __name__ == "__main__":
    main()
