"""On one GPU: a token budget far beyond the device's memory is halved on CUDA OOM until it fits, no row lost.

    python -m benchmarks.gpu_oom --tokenizer .bench_assets/qwen_tokenizer

The Qwen3-Embedding-0.6B architecture with random weights (bf16) embeds `--docs` random-id documents of
`--doc-tokens` tokens in one replica call, planned as one micro-batch, with `max_batch_tokens` = `--budget` (default 2²⁵ tokens: the first
micro-batch needs far more activation memory than any GPU has). Prints each halving, the budget it settled on,
tokens/s, and checks every row against the same rows embedded at a small budget (cosine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--docs", type=int, default=4096)
    p.add_argument("--doc-tokens", type=int, default=2048)
    p.add_argument("--budget", type=int, default=2**25)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (no OOM there)")
    p.add_argument("--layers", type=int, default=28)
    args = p.parse_args(argv)
    from transformers import AutoModel, Qwen3Config

    from actors.embedder import Embedder

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        config = Qwen3Config(vocab_size=151669, hidden_size=1024, intermediate_size=3072,
                             num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
                             head_dim=128, max_position_embeddings=32768, tie_word_embeddings=True,
                             pad_token_id=151643, eos_token_id=151643, bos_token_id=151643)
        torch.manual_seed(0)
        with torch.device(args.device):
            AutoModel.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32).save_pretrained(tmp)
        if cuda:
            torch.cuda.empty_cache()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(args.tokenizer, name), tmp)
        rng = np.random.default_rng(0)
        lengths = np.full(args.docs, args.doc_tokens)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        values = rng.integers(100, 150000, size=int(offsets[-1]))

        # a pass priced above any padding: the planner fills the budget, one micro-batch of every row
        emb = Embedder(tmp, num_gpus=int(cuda), max_batch_tokens=args.budget, batch_overhead_tokens=10**12)
        free = f"{torch.cuda.mem_get_info()[0] / 2**30:.0f} GiB" if cuda else "n/a"
        print(f"{args.docs} docs, {int(offsets[-1]):,} tokens in one call; budget {args.budget:,} tokens; "
              f"{'packed' if emb.packed else 'padded'}; free GPU memory {free}", flush=True)
        sync()
        started = time.perf_counter()
        got = emb.embed_ids(values, offsets)
        sync()
        elapsed = time.perf_counter() - started
        print(f"done in {elapsed:.1f}s ({int(offsets[-1]) / elapsed:,.0f} tokens/s incl. failed tries): "
              f"{emb.budget.halvings} halving(s), budget now {emb.max_batch_tokens:,}; peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan'):.1f} GiB", flush=True)
        check = Embedder(tmp, num_gpus=int(cuda), max_batch_tokens=4 * args.doc_tokens)
        sample = np.arange(0, args.docs, max(1, args.docs // 64))
        sub_offsets = np.concatenate([[0], np.cumsum(lengths[sample])])
        sub_values = np.concatenate([values[offsets[i]:offsets[i + 1]] for i in sample])
        want = check.embed_ids(sub_values, sub_offsets)
        cos = (got[sample] * want).sum(axis=1)
        norms = np.linalg.norm(got, axis=1)
        print(f"rows {len(got)} of {args.docs}; all unit norm: {bool(np.all(np.abs(norms - 1) < 1e-3))}; "
              f"cosine vs a small-budget run on {len(sample)} rows: min {cos.min():.5f}")
        if (cuda and emb.budget.halvings == 0) or cos.min() < 0.99 or not np.all(np.abs(norms - 1) < 1e-3):
            raise SystemExit("FAILED")
        print("OK")


if __name__ == "__main__":
    main()
