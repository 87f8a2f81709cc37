"""Loading tokenizers and models with transformers, safely: no remote code, safetensors only."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from pipelines.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPU (fp16 overflows on Qwen3-8B) and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


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


def load_model(path: str, revision: str | None, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    try:
        model = AutoModel.from_pretrained(
            path, revision=revision, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.path {path!r}: cannot load model ({exc})") from None
    return model.to(device).eval()


def is_random_init(path: str) -> bool:
    """True for the demo's randomly initialised models, whose vectors carry no meaning."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as fh:
        data: dict[str, Any] = json.load(fh)
    return bool(data.get("embedrank_random_init"))
