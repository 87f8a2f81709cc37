"""Variable-length (packed) attention for Qwen3: one row of concatenated sequences, no padding computed.

`packed_attention` is registered in transformers' attention-function registry as `ATTENTION_NAME`; a model
loaded with `attn_implementation=ATTENTION_NAME` calls it in every layer with query/key/value shaped
(batch, heads, tokens, head_dim). The sequences' boundaries come as `cu_seq_lens_q` (int32 cumulative
lengths, transformers' name for them) and `max_length_q` passed through the model's forward, or else from the
resets of `position_ids` (each sequence's positions start at 0). The model builds no mask for an
implementation unknown to its mask registry, so none is made or read.

Where it runs:
- CUDA, fp16/bf16, torch ≥ 2.10: PyTorch's FlashAttention varlen kernel (`torch.nn.attention.varlen.varlen_attn`),
  called the way the installed torch spells it (`is_causal=` in 2.10, `window_size=(-1, 0)` from 2.11;
  `enable_gqa=` from 2.12, before that the key/value heads are repeated).
- CUDA, fp16/bf16, no torch kernel but the `flash_attn` package: its `flash_attn_varlen_func`.
- Anywhere else (CPU, fp32): SDPA with a block-diagonal causal mask, the reference the kernels are tested
  against. Its mask is tokens² booleans: fine for tests and CPU-sized batches, not for 16K-token GPU batches.

Semantics are those of the padded path: causal when the module is (`Qwen3Attention.is_causal` is True, the
embedding model included), the module's `scaling`, grouped-query heads.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

ATTENTION_NAME = "embedrank_varlen"
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- packing

def cu_seqlens(lengths: np.ndarray) -> np.ndarray:
    """Cumulative lengths `[0, l0, l0+l1, …]` (int32, as the varlen kernels take them)."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int32)


def packed_positions(lengths: np.ndarray) -> np.ndarray:
    """Each token's position inside its own sequence (0, 1, … per sequence), for RoPE."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - lengths, lengths)


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative lengths of the sequences in a flattened row whose positions restart at 0 for each one."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed position_ids must start at 0 for every sequence")
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


# ------------------------------------------------------------------------------------------- reference

def block_diagonal_mask(cu: torch.Tensor, total: int, causal: bool = True) -> torch.Tensor:
    """(total, total) booleans: token i may attend to token j (same sequence, and j ≤ i if causal)."""
    idx = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:].to(torch.int64), idx, right=True)  # zero-length sequences take no token
    allowed = seq[:, None] == seq[None, :]
    if causal:
        allowed &= idx[None, :] <= idx[:, None]
    return allowed


def varlen_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                     scale: float | None = None, causal: bool = True) -> torch.Tensor:
    """Packed attention with SDPA and a block-diagonal mask: (tokens, heads, dim) in, (tokens, heads, dim) out.

    Key/value may have fewer heads (grouped-query attention): each serves `heads // kv_heads` query heads."""
    total, heads, _ = query.shape
    groups = heads // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    mask = block_diagonal_mask(cu, total, causal)
    out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


# ------------------------------------------------------------------------------------------ CUDA kernels

@functools.lru_cache(maxsize=1)
def _torch_varlen() -> tuple[Callable, frozenset[str]] | None:
    """torch's `varlen_attn` and its keyword parameters, or None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.lru_cache(maxsize=1)
def _flash_attn_varlen() -> Callable | None:
    try:
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return None
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def call_varlen_attn(fn: Callable, params: frozenset[str], query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, cu: torch.Tensor, max_length: int, scale: float,
                     causal: bool) -> torch.Tensor:
    """`fn(query, key, value, cu, cu, max, max, …)` spelt for the torch it comes from (`params`: its keywords)."""
    kwargs: dict = {}
    if "window_size" in params:  # torch ≥ 2.11: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:  # torch 2.10
        kwargs["is_causal"] = causal
    elif causal:
        raise NotImplementedError("this torch's varlen_attn takes neither window_size nor is_causal")
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, query.shape[-1] ** -0.5, rel_tol=1e-6):  # 2.10 scales by head_dim^-1/2 only
        query = query * (scale * query.shape[-1] ** 0.5)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in params:  # torch ≥ 2.12
            kwargs["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return fn(query, key, value, cu, cu, max_length, max_length, **kwargs)


def kernel_name(device: torch.device, dtype: torch.dtype) -> str:
    """Which implementation `packed_attention` uses for tensors on `device` in `dtype`."""
    if device.type == "cuda" and dtype in HALF_DTYPES:
        if _torch_varlen() is not None:
            return "torch_varlen"
        if _flash_attn_varlen() is not None:
            return "flash_attn"
    return "sdpa_reference"


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                     max_length: int, scale: float | None = None, causal: bool = True,
                     kernel: str | None = None) -> torch.Tensor:
    """Packed attention, (tokens, heads, dim) in and out, on the best implementation for the tensors."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    kernel = kernel or kernel_name(query.device, query.dtype)
    if kernel == "torch_varlen":
        fn, params = _torch_varlen()
        return call_varlen_attn(fn, params, query, key, value, cu, max_length, scale, causal)
    if kernel == "flash_attn":  # takes grouped key/value heads itself
        return _flash_attn_varlen()(query, key, value, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_length,
                                    max_seqlen_k=max_length, softmax_scale=scale, causal=causal)
    return varlen_reference(query, key, value, cu, scale, causal)


@functools.lru_cache(maxsize=8)
def packed_kernel_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a fast varlen kernel runs here and agrees with the reference: a capability check by trial (tiny
    GQA batch, lengths 1, 5 and 19), so that a GPU, driver or torch build without the kernel falls back to the
    padded path instead of failing its first batch. False on CPU and in fp32 (there is no kernel to use)."""
    device = torch.device(device_type)
    if device.type != "cuda" or not torch.cuda.is_available() or kernel_name(device, dtype) == "sdpa_reference":
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        lengths = np.array([1, 5, 19])
        total = int(lengths.sum())
        q = torch.randn(total, 4, 64, generator=gen).to(device, dtype)
        k = torch.randn(total, 2, 64, generator=gen).to(device, dtype)
        v = torch.randn(total, 2, 64, generator=gen).to(device, dtype)
        cu = torch.from_numpy(cu_seqlens(lengths)).to(device)
        got = varlen_attention(q, k, v, cu, int(lengths.max()))
        want = varlen_reference(q.float(), k.float(), v.float(), cu)
        return bool(torch.isfinite(got).all()) and float((got.float() - want).abs().max()) < 5e-2
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


# ------------------------------------------------------------------------------- transformers' registry

def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out.

    The batch's rows are flattened into one token sequence that `cu_seq_lens_q` splits (or, without it, the
    resets of `position_ids`); a 2-D attention mask is refused (there is no padding to mask)."""
    if attention_mask is not None:
        raise ValueError(f"{ATTENTION_NAME} takes packed sequences (cu_seq_lens_q or position_ids), not a mask")
    if sliding_window is not None:
        raise NotImplementedError(f"{ATTENTION_NAME} does not implement sliding-window layers")
    if dropout and module.training:
        raise NotImplementedError(f"{ATTENTION_NAME} is for inference: no attention dropout")
    cu = kwargs.get("cu_seq_lens_q")
    max_length = kwargs.get("max_length_q")
    if cu is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # one sequence per row, all of the same length
            batch, tokens = query.shape[0], query.shape[2]
            cu = torch.arange(0, (batch + 1) * tokens, tokens, device=query.device, dtype=torch.int32)
        else:
            cu = cu_seqlens_from_positions(position_ids)
    if max_length is None:
        max_length = int((cu[1:] - cu[:-1]).max())
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    batch, heads, tokens, dim = query.shape
    flat = [x.transpose(1, 2).reshape(batch * tokens, x.shape[1], dim) for x in (query, key, value)]
    out = varlen_attention(*flat, cu.to(query.device, torch.int32), int(max_length), scaling, causal)
    return out.reshape(batch, tokens, heads, dim), None


@functools.cache
def register() -> str:
    """Register `packed_attention` with transformers (once per process); returns its `attn_implementation` name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    return ATTENTION_NAME
