"""Parity of the replica with an independent implementation of the model card's transformers recipe.

The reference below follows the card line by line: a left-padding tokenizer,
one padded batch in arrival order, the card's `last_token_pool`, F.normalize.
"""

import functools

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from actors.embedder import Embedder, EmbedReplica
from actors.settings import EmbedSettings
from actors.tokenize import TextTokenizer, TokenizeBatch, ids_to_arrow

TASK = "Given a web search query, retrieve relevant passages that answer the query"
QUERIES = ["What is the capital of China?", "Explain gravity"]
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects "
    "and is responsible for the movement of planets around the sun.",
    "短い文書。🙂",
    "x",
]
LONG = " ".join(["Ray Data streams blocks between operators while actors hold model replicas."] * 40)


def card_last_token_pool(last_hidden_states, attention_mask):
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def card_embed(model_dir, texts, max_length, dims=None):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**batch)
    emb = card_last_token_pool(outputs.last_hidden_state, batch["attention_mask"])
    if dims is not None:
        emb = emb[:, :dims]
    return F.normalize(emb, p=2, dim=1).numpy()


@functools.lru_cache(maxsize=None)
def _embedder(model_dir, dims, packed=False):
    return Embedder(model_dir, dtype="float32", dimensions=dims, packed=packed)


def ours(model_dir, texts, max_length, instruction=None, dims=None, budget=16384, packed=False):
    tok = TextTokenizer(str(model_dir), None, max_length, instruction)
    ids, truncated = tok.encode(texts)
    arr = ids_to_arrow(ids)
    emb = _embedder(str(model_dir), dims, packed)
    emb.max_batch_tokens = budget
    return emb.embed_ids(arr.values.to_numpy(), arr.offsets.to_numpy()), ids, truncated


def test_documents_match_the_card(tiny_embedding_model):
    got, _, _ = ours(tiny_embedding_model, DOCUMENTS, 8192)
    want = card_embed(tiny_embedding_model, DOCUMENTS, 8192)
    assert np.abs(got - want).max() <= 1e-5


def test_queries_with_instruction_match_the_card(tiny_embedding_model):
    got, _, _ = ours(tiny_embedding_model, QUERIES, 8192, instruction=TASK)
    want = card_embed(tiny_embedding_model, [f"Instruct: {TASK}\nQuery:{q}" for q in QUERIES], 8192)
    assert np.abs(got - want).max() <= 1e-5


def test_mrl_32_dimensions_match_the_card(tiny_embedding_model):
    got, _, _ = ours(tiny_embedding_model, DOCUMENTS, 8192, dims=32)
    want = card_embed(tiny_embedding_model, DOCUMENTS, 8192, dims=32)
    assert got.shape == (len(DOCUMENTS), 32)
    assert np.abs(got - want).max() <= 1e-5


def test_texts_longer_than_max_length_match_the_card_and_keep_the_end_token(tiny_embedding_model):
    texts = [LONG, DOCUMENTS[0], LONG[::-1]]
    got, ids, truncated = ours(tiny_embedding_model, texts, 64)
    want = card_embed(tiny_embedding_model, texts, 64)
    assert np.abs(got - want).max() <= 1e-5
    assert truncated.tolist() == [True, False, True]
    assert [len(x) for x in ids][0] == 64 and ids[0][-1] == 151643
    assert ids[1][-1] == 151643


def test_packed_sequences_match_the_card_with_no_padding_computed(tiny_embedding_model):
    """The padding-free path (varlen kernels on a GPU) runs here through `actors.attention`'s CPU reference,
    SDPA with a block-diagonal mask (more in test_packed_embedder.py)."""
    texts = DOCUMENTS + [LONG, LONG[::-1], "y"]
    got, ids, _ = ours(tiny_embedding_model, texts, 256, budget=300, packed=True)
    want = card_embed(tiny_embedding_model, texts, 256)
    assert np.abs(got - want).max() <= 1e-5
    stats = _embedder(str(tiny_embedding_model), None, True).stats
    assert stats.padded_tokens == stats.real_tokens  # packed: every computed token is a real one
    one_batch, _, _ = ours(tiny_embedding_model, texts, 256, budget=10**6, packed=True)
    assert np.abs(one_batch - want).max() <= 1e-5


def test_a_text_alone_equals_it_in_a_batch(tiny_embedding_model):
    texts = DOCUMENTS + [LONG]
    batched, _, _ = ours(tiny_embedding_model, texts, 512, budget=2048)
    for i, t in enumerate(texts):
        alone, _, _ = ours(tiny_embedding_model, [t], 512)
        assert np.abs(alone[0] - batched[i]).max() <= 1e-5


def test_order_is_restored_after_length_sorting(tiny_embedding_model):
    texts = ["a", LONG, "bb cc", DOCUMENTS[1], "d"]
    small_budget, _, _ = ours(tiny_embedding_model, texts, 256, budget=300)
    one_batch, _, _ = ours(tiny_embedding_model, texts, 256, budget=10**6)
    assert np.abs(small_budget - one_batch).max() <= 1e-5
    reversed_, _, _ = ours(tiny_embedding_model, texts[::-1], 256, budget=300)
    assert np.abs(reversed_[::-1] - small_budget).max() <= 1e-5


def test_replica_stages_turn_rows_into_vectors_and_skip_rejects(tiny_embedding_model):
    table = pa.table({"id": ["a", "b", "c"], "text": [DOCUMENTS[0], None, DOCUMENTS[1]],
                      "_reject": [None, "null_text", None]})
    tokenized = TokenizeBatch(TextTokenizer(str(tiny_embedding_model), None, 8192, None))(table)
    assert tokenized.column("n_tokens").to_pylist()[1] == 0
    replica = EmbedReplica(EmbedSettings(path=str(tiny_embedding_model), dtype="float32", vector_dtype="float16"))
    out = replica(tokenized)
    assert out.column("embedding").type == pa.list_(pa.float16(), 64)
    vectors = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    want = card_embed(tiny_embedding_model, [DOCUMENTS[0], DOCUMENTS[1]], 8192)
    assert np.abs(vectors[[0, 2]].astype(np.float32) - want).max() <= 1e-3
    assert not vectors[1].any()


def test_dimensions_larger_than_the_model_are_refused(tiny_embedding_model):
    from common.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="exceeds the model's embedding size 64"):
        Embedder(str(tiny_embedding_model), dimensions=65)
