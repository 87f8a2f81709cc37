"""Loading tokenizers and models with transformers, safely: no remote code, safetensors only."""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from actors.settings import dtype_name
from common.errors import ModelLoadError
from common.model_families import check_architecture

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a config's `dtype` on `device` (`auto`: see `actors.settings.dtype_name`)."""
    return DTYPES[dtype_name(dtype, device.type == "cuda")]


def placement(num_gpus: float, dtype: str, num_threads: int | None) -> tuple[torch.device, torch.dtype]:
    """Where a replica computes and in what precision; a CPU replica uses `num_threads` threads."""
    device = resolve_device(num_gpus)
    if device.type == "cpu" and num_threads:
        torch.set_num_threads(num_threads)
    return device, resolve_dtype(dtype, device)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """One tokenizer per process and model, shared by every batch the process tokenizes."""
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.path {path!r}: cannot load tokenizer ({exc})") from None
    if not tok.is_fast:
        raise ModelLoadError(f"model.path {path!r}: a fast (Rust) tokenizer is required")
    return tok


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    """The id that fills padding; any id works (it is masked), the tokenizer's own pad token by choice."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def config_pad_id(config: Any) -> int:
    """The id that fills padding, from the model's config: its pad token, else its end token (Qwen3's configs:
    `<|endoftext|>`, the tokenizer's pad token too), else 0. Any id works (padding is masked, and right padding
    is never attended to by a real token); reading it here spares a replica that gets token ids a tokenizer
    load of its own (about 1.5 s for Qwen's: its ids come from the tokenize tasks)."""
    for value in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _from_pretrained(auto_class, path: str, revision: str | None, dtype: torch.dtype,
                     device: torch.device, attn_implementation: str | None = None,
                     task: str = "embed") -> torch.nn.Module:
    try:  # the architecture first (a hub id's config.json is not fetched by the driver's preflight)
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.path {path!r}: cannot load model ({exc})") from None
    check_architecture(path, config.to_dict(), task)
    transformers_logging.disable_progress_bar()  # no "Loading weights" bar per replica in a job's output
    try:
        model = auto_class.from_pretrained(
            path, revision=revision, dtype=dtype, trust_remote_code=False, use_safetensors=True,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.path {path!r}: cannot load model ({exc})") from None
    return model.to(device).eval()


def load_model(path: str, revision: str | None, dtype: torch.dtype, device: torch.device,
               attn_implementation: str | None = None) -> torch.nn.Module:
    """The base model (final hidden states), as the embedder needs."""
    return _from_pretrained(AutoModel, path, revision, dtype, device, attn_implementation)


def load_causal_lm(path: str, revision: str | None, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A model with its language-model head, as the reranker needs (it reads the "yes"/"no" rows of the head)."""
    return _from_pretrained(AutoModelForCausalLM, path, revision, dtype, device, task="rerank")
