"""Reranking speed on CPU: the model card's recipe against the fast path, without and with prefix sharing.

A randomly initialised Qwen3ForCausalLM of a realistic CPU size (hidden 1024,
2 layers, the real 151,936-token vocabulary and tokenizer) scores Q queries ×
N synthetic candidates whose lengths follow a long-tailed (log-normal) mix.

- card: the card's transformers recipe, written out here and independent of
  the project: batches of `--card-batch` pairs in arrival order, left padding,
  full-vocabulary logits, log_softmax over ["no", "yes"] at the last position.
  It is slow on CPU, so it runs on the first `--card-pairs` pairs only (pair
  lengths are drawn independently, so its pairs/s carries over).
- fast: `Reranker` without prefix sharing (two head rows at the last position,
  length-sorted micro-batches under a token budget).
- fast+prefix: the same, each query's common prompt prefix run once and its
  key/value cache reused by all its candidates.

Every method is timed from text to scores (tokenisation included), after one
warm-up on a few pairs, with the same `torch.set_num_threads`. "× card" is
pairs/s divided by the card's (higher is faster); max |Δ| is over the pairs both scored.
On CPU a small token budget (default 2048) wins: the planner fills a batch up
to the budget, so a large one pads many rows to the longest.

    python -m benchmarks.rerank_fast_path --queries 4 --candidates 100 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CARD_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
)
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
TASK = "Given a web search query, retrieve relevant passages that answer the query"
MAX_LENGTH = 8192

SYLLABLES = ["ka", "lo", "min", "ter", "ra", "sen", "do", "vi", "pre", "tion", "al", "ous", "ing", "be", "co", "un"]


def synthetic_corpus(queries: int, candidates: int, median_words: int, seed: int) -> list[tuple[str, str]]:
    """(query, document) pairs, candidates of each query together; word counts are log-normal, capped at 2,000."""
    rng = np.random.default_rng(seed)
    lexicon = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(3000)]
    lexicon += ["the", "of", "and", "a", "in", "is", "to", "for", "with", "on"] * 60

    def words(n: int) -> str:
        return " ".join(rng.choice(lexicon, size=n)).capitalize() + "."

    pairs = []
    for _ in range(queries):
        query = words(int(rng.integers(4, 12))).rstrip(".") + "?"
        counts = np.clip(rng.lognormal(np.log(median_words), 0.8, size=candidates), 3, 2000).astype(int)
        pairs += [(query, words(int(n))) for n in counts]
    return pairs


class CardReranker:
    """The model card's transformers recipe, as published (full logits, left padding, batches in arrival order)."""

    def __init__(self, path: str, batch_size: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.prefix_tokens = self.tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
        self.batch_size = batch_size

    def process_inputs(self, pairs: list[str]):
        inputs = self.tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                                max_length=MAX_LENGTH - len(self.prefix_tokens) - len(self.suffix_tokens))
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        return self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=MAX_LENGTH)

    @torch.no_grad()
    def compute_logits(self, inputs) -> list[float]:
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        return batch_scores[:, 1].exp().tolist()

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        texts = [f"<Instruct>: {TASK}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            scores += self.compute_logits(self.process_inputs(texts[start : start + self.batch_size]))
        return np.array(scores, dtype=np.float32)


class FastReranker:
    """The project's `PairTokenizer` + `Reranker`, grouping candidates by query."""

    def __init__(self, path: str, share_prefix: bool, max_batch_tokens: int):
        from actors.reranker import PairTokenizer, Reranker

        self.tokenizer = PairTokenizer(path, None, MAX_LENGTH, None)
        self.reranker = Reranker(path, dtype="float32", max_batch_tokens=max_batch_tokens, share_prefix=share_prefix)

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        ids, _ = self.tokenizer.encode([q for q, _ in pairs], [d for _, d in pairs])
        codes: dict[str, int] = {}
        group = np.array([codes.setdefault(q, len(codes)) for q, _ in pairs])
        return self.reranker.score_ids(ids, group)


def timed(method, pairs, repeats: int) -> tuple[list[float], np.ndarray]:
    method.score(pairs[:8])
    times, scores = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        scores = method.score(pairs)
        times.append(time.perf_counter() - started)
    return times, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--card-pairs", type=int, default=48, help="pairs the (slow) card recipe scores")
    parser.add_argument("--card-repeats", type=int, default=1)
    parser.add_argument("--median-words", type=int, default=56, help="median document length in words (~100 tokens)")
    parser.add_argument("--card-batch", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from actors.loading import load_tokenizer
    from actors.random_qwen import build_random_qwen3

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`=`True`")  # the card's pad call
    pairs = synthetic_corpus(args.queries, args.candidates, args.median_words, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_random_qwen3(f"{tmp}/qwen3-reranker-bench", kind="reranker", hidden_size=1024,
                                      num_layers=2, num_heads=16, num_kv_heads=8, head_dim=128,
                                      intermediate_size=3072))
        fast = FastReranker(path, share_prefix=False, max_batch_tokens=args.max_batch_tokens)
        lengths = np.array([len(x) for x in fast.tokenizer.encode([q for q, _ in pairs], [d for _, d in pairs])[0]])
        docs = load_tokenizer(path)([d for _, d in pairs], add_special_tokens=False)["input_ids"]
        doc_tokens = [len(x) for x in docs]
        print(f"document tokens: median {int(np.median(doc_tokens))}, p90 {int(np.percentile(doc_tokens, 90))}")
        print(f"{len(pairs)} pairs ({args.queries} queries × {args.candidates}); tokens per pair: median "
              f"{int(np.median(lengths))}, p90 {int(np.percentile(lengths, 90))}, max {lengths.max()}; "
              f"prompt prefix {len(fast.tokenizer.prefix_ids)} + suffix {len(fast.tokenizer.suffix_ids)}; "
              f"{args.threads} threads, torch {torch.__version__}")
        card_pairs = pairs[: args.card_pairs]
        results = {"card": timed(CardReranker(path, args.card_batch), card_pairs, args.card_repeats)}
        results["fast"] = timed(fast, pairs, args.repeats)
        shared = FastReranker(path, share_prefix=True, max_batch_tokens=args.max_batch_tokens)
        results["fast+prefix"] = timed(shared, pairs, args.repeats)

    card_times, card_scores = results["card"]
    card_per_pair = statistics.median(card_times) / len(card_scores)
    print(f"{'method':<12} {'pairs':>6} {'pairs/s':>8} {'median s':>9} {'× card':>7} {'max |Δ| vs card':>16}  runs")
    for name, (times, scores) in results.items():
        median = statistics.median(times)
        delta = float(np.abs(scores[: len(card_scores)] - card_scores).max())
        print(f"{name:<12} {len(scores):>6} {len(scores) / median:8.2f} {median:9.2f} "
              f"{card_per_pair * len(scores) / median:7.2f} {delta:16.2e}  {len(times)}")
    s = shared.reranker.stats
    print(f"fast+prefix: {s.shared_groups} shared groups, {s.prefix_tokens_saved} prefix tokens saved, "
          f"{s.padded_tokens} tokens computed for {s.real_tokens} real ({s.rows} rows, warm-up included)")


if __name__ == "__main__":
    main()
