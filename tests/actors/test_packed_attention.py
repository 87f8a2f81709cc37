"""Packed (variable-length) attention: the registered function against plain per-sequence SDPA.

On CPU the function runs its reference (SDPA with a block-diagonal causal mask); the CUDA kernels' calling
conventions are checked here with stand-ins that have each torch version's signature, and against the
reference on a real GPU in the `gpu` test at the end.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actors import attention as att
from actors.attention import (
    ATTENTION_NAME,
    block_diagonal_mask,
    call_varlen_attn,
    cu_seqlens,
    cu_seqlens_from_positions,
    kernel_name,
    packed_attention,
    packed_kernel_works,
    packed_positions,
    register,
    varlen_attention,
    varlen_reference,
)

LENGTH_SETS = [[1], [1, 1, 1], [7], [5, 1, 12, 3], [1, 33, 2, 64, 1, 17]]


def per_sequence_sdpa(q, k, v, lengths, scale=None, causal=True):
    """Each sequence alone through SDPA, (tokens, heads, dim) in and out: the independent reference."""
    outs, start = [], 0
    groups = q.shape[1] // k.shape[1]
    for n in lengths:
        sl = slice(start, start + n)
        qs, ks, vs = (x[sl].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(outs)


def random_qkv(lengths, heads=8, kv_heads=2, dim=32, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    total = int(sum(lengths))
    return (torch.randn(total, heads, dim, generator=gen, dtype=dtype),
            torch.randn(total, kv_heads, dim, generator=gen, dtype=dtype),
            torch.randn(total, kv_heads, dim, generator=gen, dtype=dtype))


class Module(torch.nn.Module):
    is_causal = True


def test_cu_seqlens_and_positions_restart_for_each_sequence():
    lengths = np.array([3, 1, 2])
    cu = cu_seqlens(lengths)
    assert cu.tolist() == [0, 3, 4, 6] and cu.dtype == np.int32
    positions = packed_positions(lengths)
    assert positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert cu_seqlens_from_positions(torch.from_numpy(positions)[None]).tolist() == cu.tolist()
    assert cu_seqlens_from_positions(torch.from_numpy(positions)[None]).dtype == torch.int32
    with pytest.raises(ValueError, match="start at 0"):
        cu_seqlens_from_positions(torch.tensor([[1, 2, 0]]))


def test_the_block_diagonal_mask_is_causal_within_each_sequence_and_skips_empty_ones():
    cu = torch.tensor([0, 2, 2, 3], dtype=torch.int32)  # lengths 2, 0, 1
    assert block_diagonal_mask(cu, 3).tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert block_diagonal_mask(cu, 3, causal=False).tolist() == [[True, True, False], [True, True, False],
                                                                 [False, False, True]]


@pytest.mark.parametrize("lengths", LENGTH_SETS)
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_packed_attention_equals_each_sequence_alone(lengths, kv_heads):
    q, k, v = random_qkv(lengths, kv_heads=kv_heads, seed=len(lengths) + kv_heads)
    cu = torch.from_numpy(cu_seqlens(lengths))
    want = per_sequence_sdpa(q, k, v, lengths)
    got = varlen_attention(q, k, v, cu, max(lengths))
    assert kernel_name(q.device, q.dtype) == "sdpa_reference"
    assert (got - want).abs().max() <= 1e-5


def test_scale_and_non_causal_attention_follow_sdpa():
    lengths = [4, 1, 9]
    q, k, v = random_qkv(lengths)
    cu = torch.from_numpy(cu_seqlens(lengths))
    for scale, causal in ((0.05, True), (None, False), (0.3, False)):
        want = per_sequence_sdpa(q, k, v, lengths, scale=scale, causal=causal)
        assert (varlen_reference(q, k, v, cu, scale, causal) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("source", ["cu_seq_lens", "position_ids"])
def test_the_registered_function_takes_transformers_shapes_and_kwargs(source):
    lengths = [3, 1, 6, 2]
    q, k, v = random_qkv(lengths, heads=4, kv_heads=2, dim=16)
    want = per_sequence_sdpa(q, k, v, lengths, scale=0.25)
    as_hf = [x.transpose(0, 1)[None] for x in (q, k, v)]  # (batch 1, heads, tokens, dim)
    cu = torch.from_numpy(cu_seqlens(lengths))
    kwargs = ({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 6, "max_length_k": 6}
              if source == "cu_seq_lens" else {"position_ids": torch.from_numpy(packed_positions(lengths))[None]})
    out, weights = packed_attention(Module(), *as_hf, None, dropout=0.0, scaling=0.25, sliding_window=None, **kwargs)
    assert weights is None and out.shape == (1, sum(lengths), 4, 16)  # (batch, tokens, heads, dim)
    assert (out[0] - want).abs().max() <= 1e-5


def test_the_registered_function_refuses_what_it_does_not_implement():
    q, k, v = (x.transpose(0, 1)[None] for x in random_qkv([4], heads=2, kv_heads=2, dim=8))
    with pytest.raises(ValueError, match="not a mask"):
        packed_attention(Module(), q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="sliding-window"):
        packed_attention(Module(), q, k, v, None, sliding_window=2)


def test_registration_puts_it_in_transformers_registry():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert register() == ATTENTION_NAME
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] is packed_attention


def _stand_in(signature):
    """A CPU stand-in for one torch version's `varlen_attn` that records its keywords; it computes with the
    reference, refusing grouped key/value heads unless its signature has `enable_gqa` and it is set."""
    calls = []

    def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
        assert set(kwargs) <= signature, kwargs
        assert cu_seq_q is cu_seq_k and cu_seq_q.dtype == torch.int32 and max_q == max_k
        calls.append(kwargs)
        if key.shape[1] != query.shape[1] and not kwargs.get("enable_gqa"):
            raise ValueError("Expect query and key/value to have the same number of heads")
        causal = kwargs.get("is_causal", kwargs.get("window_size") == (-1, 0))
        return varlen_reference(query, key, value, cu_seq_q, kwargs.get("scale"), causal)

    return fake, frozenset(signature), calls


@pytest.mark.parametrize("version,signature", [
    ("2.10", {"is_causal", "return_aux"}),
    ("2.11", {"return_aux", "scale", "window_size"}),
    ("2.12", {"return_aux", "scale", "window_size", "enable_gqa", "seqused_k", "block_table", "num_splits"}),
])
def test_varlen_attn_is_called_the_way_each_torch_version_spells_it(version, signature):
    lengths = [1, 8, 3]
    q, k, v = random_qkv(lengths, heads=8, kv_heads=2, dim=16)
    cu = torch.from_numpy(cu_seqlens(lengths))
    fake, params, calls = _stand_in(signature)
    for scale in (16 ** -0.5, 0.1):  # the model's default scaling, and another one
        got = call_varlen_attn(fake, params, q, k, v, cu, 8, scale, True)
        assert (got - per_sequence_sdpa(q, k, v, lengths, scale=scale)).abs().max() <= 1e-5
    kwargs = calls[-1]
    assert (kwargs.get("is_causal") is True) if version == "2.10" else kwargs["window_size"] == (-1, 0)
    assert kwargs.get("enable_gqa", False) is (version == "2.12")


def test_the_installed_torch_has_the_kernel_and_it_is_cuda_only():
    """What the capability check guards against: torch's kernel exists here (≥ 2.10) but not for CPU."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = random_qkv([3, 3], heads=2, kv_heads=2, dim=16, dtype=torch.bfloat16)
    cu = torch.from_numpy(cu_seqlens([3, 3]))
    with pytest.raises(NotImplementedError):
        varlen_attn(q, k, v, cu, cu, 3, 3)
    assert att._torch_varlen() is not None
    assert not packed_kernel_works("cpu", torch.bfloat16)
    assert kernel_name(torch.device("cpu"), torch.bfloat16) == "sdpa_reference"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_varlen_kernel_matches_the_reference(dtype):
    assert packed_kernel_works("cuda", dtype)
    for lengths in LENGTH_SETS + [[1, 511, 2, 1000, 3]]:
        q, k, v = (x.cuda() for x in random_qkv(lengths, heads=16, kv_heads=8, dim=128, dtype=dtype))
        cu = torch.from_numpy(cu_seqlens(lengths)).cuda()
        got = varlen_attention(q, k, v, cu, max(lengths))
        want = per_sequence_sdpa(q.float(), k.float(), v.float(), lengths)
        assert kernel_name(q.device, dtype) in ("torch_varlen", "flash_attn")
        assert (got.float() - want).abs().max() <= 2e-2
