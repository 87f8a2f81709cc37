"""The embedder's packed path (registered varlen attention; here its CPU reference) against the card's recipe.

`card_embed` in test_embedder_parity is the independent implementation of the model card (left padding,
one padded batch, the card's pooling); the packed path must match it to 1e-5 in fp32, with and without
token buckets, and report the tokens it really computed.
"""

import functools

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_embedder_parity import DOCUMENTS, LONG, QUERIES, TASK
from test_embedder_parity import card_embed as _card_embed

from actors.attention import ATTENTION_NAME
from actors.batching import MIN_BUCKET_TOKENS, token_buckets
from actors.embedder import Embedder, EmbedReplica
from actors.settings import EmbedSettings
from actors.tokenize import TextTokenizer, TokenizeBatch, ids_to_arrow

TEXTS = DOCUMENTS + [LONG, LONG[::-1], "y", "Explain gravity", DOCUMENTS[1] * 3]


@functools.lru_cache(maxsize=None)
def packed_embedder(model_dir, dims=None, buckets=False):
    return Embedder(model_dir, dtype="float32", dimensions=dims, packed=True, token_buckets=buckets)


@functools.lru_cache(maxsize=None)
def _card(model_dir, texts, max_length, dims):
    return _card_embed(model_dir, list(texts), max_length, dims)


def card_embed(model_dir, texts, max_length, dims=None):
    """The card's recipe, once per input (it loads its tokenizer and model on each call)."""
    return _card(model_dir, tuple(texts), max_length, dims)


@functools.lru_cache(maxsize=None)
def text_tokenizer(model_dir, max_length, instruction):
    return TextTokenizer(str(model_dir), None, max_length, instruction)


def encode(model_dir, texts, max_length=256, instruction=None):
    ids, _ = text_tokenizer(model_dir, max_length, instruction).encode(texts)
    arr = ids_to_arrow(ids)
    return arr.values.to_numpy(), arr.offsets.to_numpy()


def run(emb, values, offsets, budget):
    emb.max_batch_tokens = budget
    return emb.embed_ids_padded(values, offsets)


def test_packing_is_explicit_on_cpu_and_runs_the_registered_reference(tiny_embedding_model):
    packed = packed_embedder(str(tiny_embedding_model))
    assert packed.packed and packed.attention == "sdpa_reference"
    assert packed.model.config._attn_implementation == ATTENTION_NAME
    default = Embedder(str(tiny_embedding_model), dtype="float32")
    assert not default.packed and default.attention == "padded"  # no varlen kernel on a CPU: padded batches


@pytest.mark.parametrize("buckets", [False, True])
@pytest.mark.parametrize("budget", [300, 1024, 10**6])
def test_packed_vectors_match_the_card(tiny_embedding_model, buckets, budget):
    values, offsets = encode(tiny_embedding_model, TEXTS, 256)
    got, _ = run(packed_embedder(str(tiny_embedding_model), None, buckets), values, offsets, budget)
    assert np.abs(got - card_embed(tiny_embedding_model, TEXTS, 256)).max() <= 1e-5


def test_packed_queries_and_mrl_match_the_card(tiny_embedding_model):
    texts = [f"Instruct: {TASK}\nQuery:{q}" for q in QUERIES]
    values, offsets = encode(tiny_embedding_model, QUERIES, 8192, instruction=TASK)
    got, _ = run(packed_embedder(str(tiny_embedding_model), 32, True), values, offsets, 512)
    want = card_embed(tiny_embedding_model, texts, 8192, dims=32)
    assert got.shape == (2, 32) and np.abs(got - want).max() <= 1e-5


def test_a_text_alone_equals_it_in_a_packed_bucketed_batch(tiny_embedding_model):
    emb = packed_embedder(str(tiny_embedding_model), None, True)
    values, offsets = encode(tiny_embedding_model, TEXTS, 256)
    batched, _ = run(emb, values, offsets, 1024)
    for i, t in enumerate(TEXTS):
        alone, _ = run(emb, *encode(tiny_embedding_model, [t], 256), 1024)
        assert np.abs(alone[0] - batched[i]).max() <= 1e-5


def record_forward_widths(emb):
    """Wrap the model so each forward pass records how many token positions it was given."""
    widths = []
    forward = emb.model.forward

    def recording(*args, **kwargs):
        widths.append(int(kwargs["input_ids"].numel()))
        return forward(*args, **kwargs)

    emb.model.forward = recording
    return widths


@pytest.mark.parametrize("buckets", [False, True])
def test_computed_tokens_are_measured_on_what_ran(tiny_embedding_model, buckets):
    emb = Embedder(str(tiny_embedding_model), dtype="float32", packed=True, token_buckets=buckets,
                   max_batch_tokens=600)
    widths = record_forward_widths(emb)
    values, offsets = encode(tiny_embedding_model, TEXTS, 256)
    lengths = np.diff(offsets)
    _, per_row = emb.embed_ids_padded(values, offsets)
    assert emb.stats.real_tokens == lengths.sum()
    assert emb.stats.padded_tokens == sum(widths) == per_row.sum()
    assert np.all(per_row >= lengths)
    if buckets:  # each pass was a fixed shape, and the padding that filled it is counted
        assert set(widths) <= set(token_buckets(600, MIN_BUCKET_TOKENS).tolist())
        assert emb.stats.padded_tokens > emb.stats.real_tokens
    else:
        assert emb.stats.padded_tokens == emb.stats.real_tokens


def test_only_each_sequences_last_hidden_state_goes_through_the_final_norm(tiny_embedding_model):
    emb = packed_embedder(str(tiny_embedding_model), None, True)
    seen = []
    handle = emb.model.norm.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    try:
        run(emb, *encode(tiny_embedding_model, TEXTS[:5], 256), 10**6)
    finally:
        handle.remove()
    assert seen == [(1, 5, emb.hidden_size)]
    assert not emb.model.norm._forward_pre_hooks  # the hook is gone after the pass


def test_a_bucketed_embedder_that_runs_out_of_memory_returns_the_vectors_it_would_have(tiny_embedding_model):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(10, 5000, size=int(n)) for n in rng.integers(1, 120, size=60)]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    values = np.concatenate(seqs)
    expected = Embedder(str(tiny_embedding_model), dtype="float32").embed_ids(values, offsets)

    tight = Embedder(str(tiny_embedding_model), dtype="float32", packed=True, token_buckets=True,
                     max_batch_tokens=4096, batch_overhead_tokens=10**6)
    forward = tight._forward_packed
    widths = []

    def forward_with_limited_memory(batch):
        vectors, tokens = forward(batch)
        if tokens > 1024:
            raise torch.OutOfMemoryError("CUDA out of memory")
        widths.append(tokens)
        return vectors, tokens

    tight._forward_packed = forward_with_limited_memory
    got, per_row = tight.embed_ids_padded(values, offsets)
    assert tight.budget.halvings >= 1 and tight.max_batch_tokens <= 1024
    assert tight.stats.rows == 60 and per_row.sum() == sum(widths) == tight.stats.padded_tokens
    assert set(widths) <= set(token_buckets(tight.max_batch_tokens, MIN_BUCKET_TOKENS).tolist())
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_replica_takes_packing_and_buckets_from_its_settings(tiny_embedding_model):
    table = pa.table({"id": ["a", "b", "c"], "text": [DOCUMENTS[0], None, DOCUMENTS[1]],
                      "_reject": [None, "null_text", None]})
    tokenized = TokenizeBatch(TextTokenizer(str(tiny_embedding_model), None, 8192, None))(table)
    replica = EmbedReplica(EmbedSettings(path=str(tiny_embedding_model), dtype="float32", packed=True,
                                         token_buckets=True))
    assert replica.embedder.packed and replica.embedder.budget.min_bucket == MIN_BUCKET_TOKENS
    out = replica(tokenized)
    padded = out.column("_padded").to_numpy()
    assert padded[1] == 0 and padded.sum() == replica.embedder.stats.padded_tokens == MIN_BUCKET_TOKENS
    vectors = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    want = card_embed(tiny_embedding_model, [DOCUMENTS[0], DOCUMENTS[1]], 8192)
    assert np.abs(vectors[[0, 2]] - want).max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("buckets", [False, True])
def test_cuda_packed_path_matches_the_padded_path_in_bf16(tiny_embedding_model, buckets):
    packed = Embedder(str(tiny_embedding_model), num_gpus=1, dtype="bfloat16", token_buckets=buckets)
    assert packed.packed and packed.attention in ("torch_varlen", "flash_attn")  # on by default on a GPU
    padded = Embedder(str(tiny_embedding_model), num_gpus=1, dtype="bfloat16", packed=False)
    values, offsets = encode(tiny_embedding_model, TEXTS, 256)
    got, want = packed.embed_ids(values, offsets), padded.embed_ids(values, offsets)
    assert np.abs(got - want).max() <= 3e-2
    assert np.all((got * want).sum(axis=1) >= 0.999)
