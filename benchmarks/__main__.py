"""CPU speed table: the embedder and reranker fast paths against their peers, side by side in one process.

    python -m benchmarks            # default, about 5 minutes on 2 idle cores (much longer when shared)
    python -m benchmarks --quick    # about 1-2 minutes, one round, noisier

Model: a randomly initialised Qwen3 of realistic CPU size — hidden 1024, 2 layers, 16 query heads of 128,
8 key/value heads, MLP 3072, the real 151,936-token vocabulary and tokenizer — in float32. Speed does not
depend on the weights' values.

Corpus (seeded): documents whose token counts are log-normal, median `--median` (200), σ `--sigma` (1.2,
which puts p99.9 near 8K), capped at `--cap` tokens — 1,024 by default so that the padded peers finish on a
2-core machine (the GPU benchmark, `benchmarks/gpu.py`, keeps the tail to 8K). Texts are built to hit
those counts exactly.

- E1: ours (`TextTokenizer` + `Embedder`, the pipeline's defaults: 256 rows per call, token budget 16384)
  against the model card's plain transformers recipe (batches of 32 in arrival order, padded to the longest).
- E2: ours against sentence-transformers `encode` (same model files, batch 32; it sorts by length).
- E5: padding efficiency, real ÷ computed tokens, measured by a hook on each model.
- E6: the reranker fast path (prefix sharing on, as configs/rerank.yaml) against the card's reranker recipe,
  with `benchmarks.rerank_fast_path`'s corpus and classes; the card scores the first `--rerank-card-pairs`
  pairs only (pair lengths are independent, so its pairs/s carries over).

Every method runs from texts to vectors (or scores), tokenisation included, after a warm-up; repeats are
interleaved with the order rotated each round; the ratio is the median over rounds of (ours rate ÷ peer
rate) in the same round. The machine is shared, so single numbers are noisy; ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import embed_common as ec  # noqa: E402

GOALS = {"E1": 3.0, "E2": 1.3, "E5": 0.97, "E6": 4.0}
NOTES: list[str] = []  # printed under the table


def round_ratios(ours_times, ours_n, peer_times, peer_n) -> list[float]:
    return [(ours_n / a) / (peer_n / b) for a, b in zip(ours_times, peer_times)]


def fmt_ratio(ratios: list[float]) -> str:
    if not ratios:
        return "n/a"
    med = statistics.median(ratios)
    return f"{med:.2f}× ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else f"{med:.2f}×"


def embedding_rows(args, tmp: str) -> list[tuple]:
    from actors.loading import load_tokenizer
    from actors.random_qwen import build_random_qwen3

    path = str(build_random_qwen3(f"{tmp}/qwen3-embedding-bench", kind="embedding", hidden_size=1024,
                                  num_layers=2, num_heads=16, num_kv_heads=8, head_dim=128,
                                  intermediate_size=3072))
    ec.write_sentence_transformers_files(path, 1024, args.cap)
    lengths = ec.lognormal_lengths(args.docs, args.median, args.sigma, args.cap, args.seed)
    texts = ec.TextMaker(load_tokenizer(path), args.seed).texts(np.maximum(lengths - 1, 1))

    ours = ec.Ours(path, args.cap, device="cpu", dtype="float32", max_batch_tokens=args.max_batch_tokens,
                   batch_rows=args.batch_rows, num_threads=args.threads)
    card = ec.Card(path, args.cap, device="cpu", dtype=torch.float32, batch=args.batch)
    methods: list[ec.Method] = [ours, card]
    st_note = ""
    try:
        import sentence_transformers

        methods.append(ec.SentenceTransformersPeer(path, args.cap, device="cpu", dtype=torch.float32,
                                                   batch=args.batch))
        st_note = f"sentence-transformers {sentence_transformers.__version__}"
    except ImportError:
        st_note = "sentence-transformers not installed (pip install -e '.[bench]')"
    real = np.diff(ours.encode_ids(texts)[1])
    print(f"corpus: {len(texts)} docs, {int(real.sum()):,} tokens (median {int(np.median(real))}, p90 "
              f"{int(np.percentile(real, 90))}, max {int(real.max())}; log-normal median {args.median:g}, "
          f"σ {args.sigma}, cap {args.cap}); {st_note}")
    res = ec.interleaved(methods, texts, args.repeats, "cpu", log=print)
    n = len(texts)
    o = res["ours"]
    ours_rate = n / ec.median(o["times"])
    delta = ec.max_cos_delta(o["vectors"], res["card"]["vectors"])
    rows = []
    c = res["card"]
    r1 = round_ratios(o["times"], n, c["times"], n)
    rows.append(("E1", "ours vs card recipe (batch 32, arrival order, pad to longest)", f"{ours_rate:.2f}",
                 f"{n / ec.median(c['times']):.2f}", r1, GOALS["E1"], f"1−cos vs card {delta:.0e}"))
    if "st" in res:
        s = res["st"]
        r2 = round_ratios(o["times"], n, s["times"], n)
        rows.append(("E2", f"ours vs sentence-transformers encode (batch {args.batch})", f"{ours_rate:.2f}",
                     f"{n / ec.median(s['times']):.2f}", r2, GOALS["E2"],
                     f"1−cos vs card {ec.max_cos_delta(s['vectors'], c['vectors']):.0e}"))
    tokens_s = float(real.sum()) / ec.median(o["times"])
    NOTES.append(f"projection: {1e9 * 512 / tokens_s / 3600:,.0f} replica-hours (one replica of {args.threads} "
                 f"CPU thread(s)) per billion 512-token documents at ours' {tokens_s:,.0f} tokens/s on this "
                 "corpus and this 2-layer model (a real Qwen3-Embedding-0.6B has 28 layers: ~14× the work per "
                 "token); the GPU figure is in benchmarks/gpu.py's output")
    eff = {k: v["real"] / v["computed"] for k, v in res.items() if v["computed"]}
    peers = ", ".join(f"{k} {v:.3f}" for k, v in eff.items() if k != "ours")
    rows.append(("E5", "padding efficiency, real ÷ computed tokens", f"{eff['ours']:.3f}", peers,
                 None, GOALS["E5"], ""))
    return rows


def rerank_row(args, tmp: str) -> tuple[tuple, str]:
    from actors.random_qwen import build_random_qwen3
    from benchmarks import rerank_fast_path as rr

    warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`=`True`")
    path = str(build_random_qwen3(f"{tmp}/qwen3-reranker-bench", kind="reranker", hidden_size=1024,
                                  num_layers=2, num_heads=16, num_kv_heads=8, head_dim=128,
                                  intermediate_size=3072))
    pairs = rr.synthetic_corpus(args.rerank_queries, args.rerank_candidates, 56, args.seed)
    card_pairs = pairs[: args.rerank_card_pairs]
    print(f"rerank: {len(pairs)} pairs ({args.rerank_queries} queries × {args.rerank_candidates}), card on "
          f"the first {len(card_pairs)}")
    fast = rr.FastReranker(path, share_prefix=True, max_batch_tokens=2048)
    card = rr.CardReranker(path, 16)
    fast.score(pairs[:8])
    card.score(pairs[:8])
    times = {"fast": [], "card": []}
    scores = {}
    for r in range(args.repeats):
        order = [("fast", fast, pairs), ("card", card, card_pairs)]
        for name, method, ps in (order if r % 2 == 0 else order[::-1]):
            started = time.perf_counter()
            scores[name] = method.score(ps)
            times[name].append(time.perf_counter() - started)
            print(f"  round {r + 1}: rerank {name} {times[name][-1]:.2f}s")
    ratios = round_ratios(times["fast"], len(pairs), times["card"], len(card_pairs))
    delta = float(np.abs(scores["fast"][: len(card_pairs)] - scores["card"]).max())
    row = ("E6", f"reranker fast path + prefix sharing vs card recipe (batch 16; card on {len(card_pairs)} pairs)",
           f"{len(pairs) / ec.median(times['fast']):.2f}", f"{len(card_pairs) / ec.median(times['card']):.2f}",
           ratios, GOALS["E6"], f"max |Δscore| {delta:.0e}")
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="about a minute: fewer documents, pairs and repeats")
    p.add_argument("--docs", type=int, default=None, help="documents (default 48; --quick 32)")
    p.add_argument("--median", type=float, default=200)
    p.add_argument("--sigma", type=float, default=1.2)
    p.add_argument("--cap", type=int, default=None, help="max tokens per document, max_length (default 1024; "
                   "--quick 512)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the card recipe and sentence-transformers")
    p.add_argument("--batch-rows", type=int, default=256, help="rows per replica call (pipeline default)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="our token budget (pipeline default)")
    p.add_argument("--rerank-queries", type=int, default=2)
    p.add_argument("--rerank-candidates", type=int, default=None, help="per query (default 50; --quick 16)")
    p.add_argument("--rerank-card-pairs", type=int, default=None, help="default 32; --quick 16")
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    q = args.quick
    args.docs = args.docs or (32 if q else 48)
    args.cap = args.cap or (512 if q else 1024)
    args.repeats = args.repeats or (1 if q else 3)
    args.rerank_candidates = args.rerank_candidates or (16 if q else 50)
    args.rerank_card_pairs = args.rerank_card_pairs or (16 if q else 32)

    ec.quiet()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    print(f"torch {torch.__version__}, {args.threads} threads; random Qwen3 hidden 1024 × 2 layers, fp32; "
          f"{args.repeats} interleaved round(s); ratio = median over rounds (min–max)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = embedding_rows(args, tmp)
        if not args.no_rerank:
            rows.append(rerank_row(args, tmp))

    print()
    print(f"{'':<3} {'comparison':<68} {'ours/s':>8} {'peer/s':>22} {'ratio':>20} {'goal':>7} met  note")
    for key, what, ours, peer, ratios, goal, note in rows:
        if ratios is None:  # E5: ours' efficiency against the goal
            value, shown, goal_s = float(ours), "—", f"≥{goal}"
        else:
            value, shown, goal_s = statistics.median(ratios), fmt_ratio(ratios), f"≥{goal:g}×"
        met = "yes" if value >= goal else "NO"
        print(f"{key:<3} {what:<68} {ours:>8} {peer:>22} {shown:>20} {goal_s:>7} {met:<4} {note}")
    for note in NOTES:
        print(note)
    print(f"\nunits: docs/s (E6: pairs/s); total {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
