"""Parity of the reranker with an independent implementation of the model card's transformers recipe.

The reference below follows the card: a left-padding tokenizer, truncation of
the user turn to what the prompt leaves, `tokenizer.pad`, full-vocabulary
logits of the last position, log_softmax over ["no", "yes"]. The tiny model's
head is set so that scores spread over (0, 1) instead of sitting near one
value, which would make a 1e-5 tolerance prove little.
"""

import functools

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.reranker import PairTokenizer, Reranker, RerankReplica, common_prefix_length
from actors.settings import RerankSettings
from common.errors import ModelLoadError

pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`=`True`:UserWarning")

TASK = "Given a web search query, retrieve relevant passages that answer the query"
CARD_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
)
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

QUERIES = ["What is the capital of China?", "Explain gravity", "¿Cuál es la montaña más alta?", "光合作用是什么"]
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects "
    "and is responsible for the movement of planets around the sun.",
    "El Everest, en el Himalaya, es la montaña más alta del mundo sobre el nivel del mar.",
    "光合作用是植物利用光能把二氧化碳和水转化为有机物并释放氧气的过程。🌿",
    "x",
    " ".join(["Ray Data streams blocks between operators while actors hold model replicas."] * 8),
]
LONG = " ".join(["Der Reranker liest nur die letzte Position; the suffix must survive truncation."] * 20)


@pytest.fixture(scope="module")
def spread_reranker_model(tmp_path_factory):
    """A random Qwen3ForCausalLM (hidden 64, 2 layers) with the real Qwen tokenizer and an untied head.

    Random heads score every pair near the same value; here the "yes" row is the
    "no" row plus the direction in which the test pairs' last hidden states vary
    most (made orthogonal to their mean), so P(yes) spreads over (0, 1).
    """
    from actors.random_qwen import build_random_qwen3

    path = build_random_qwen3(tmp_path_factory.mktemp("models") / "qwen3-reranker-tiny", kind="reranker", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    no, yes = tokenizer.convert_tokens_to_ids(["no", "yes"])
    prompts = [f"{CARD_PREFIX}<Instruct>: {TASK}\n<Query>: {q}\n<Document>: {d}{CARD_SUFFIX}"
               for q in QUERIES for d in DOCUMENTS]
    with torch.no_grad():
        hidden = torch.stack([model.model(**tokenizer(p, return_tensors="pt")).last_hidden_state[0, -1]
                              for p in prompts])
        mean = hidden.mean(0) / hidden.mean(0).norm()
        direction = torch.linalg.svd(hidden - hidden.mean(0), full_matrices=False).Vh[0]
        direction -= (direction @ mean) * mean
        direction *= 2.5 / ((hidden - hidden.mean(0)) @ direction).std()
        head = model.model.embed_tokens.weight.detach().clone()
        head[yes] = head[no] + direction
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(path)
    return str(path)


@functools.lru_cache(maxsize=None)
def _card_model(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def card_scores(model_dir, pairs, max_length=8192, instruction=TASK, batch_size=8):
    """Scores and unpadded token ids as the card computes them, in padded batches of `batch_size` pairs."""
    scores, ids = [], []
    for start in range(0, len(pairs), batch_size):
        s, i = card_batch(model_dir, pairs[start : start + batch_size], max_length, instruction)
        scores.append(s)
        ids += i
    return np.concatenate(scores), ids


def card_batch(model_dir, pairs, max_length, instruction):
    tokenizer, model = _card_model(model_dir)
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    prefix_tokens = tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
    texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    ids = [list(x) for x in inputs["input_ids"]]
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        batch_scores = model(**inputs).logits[:, -1, :]
    scores = torch.stack([batch_scores[:, token_false_id], batch_scores[:, token_true_id]], dim=1)
    scores = torch.nn.functional.log_softmax(scores, dim=1)
    return scores[:, 1].exp().numpy(), ids


@pytest.fixture(scope="module")
def reranker(spread_reranker_model):
    return Reranker(spread_reranker_model, dtype="float32")


@functools.lru_cache(maxsize=None)
def _pair_tokenizer(model_dir, max_length):
    return PairTokenizer(model_dir, None, max_length, None)


def ours(reranker, model_dir, pairs, max_length=8192, group=None, budget=16384, share_prefix=True):
    tok = _pair_tokenizer(model_dir, max_length)
    ids, truncated = tok.encode([q for q, _ in pairs], [d for _, d in pairs])
    reranker.max_batch_tokens = budget
    reranker.share_prefix = share_prefix
    return reranker.score_ids(ids, group), ids, truncated


def all_pairs():
    return [(q, d) for q in QUERIES for d in DOCUMENTS]


def test_scores_and_ids_match_the_card(reranker, spread_reranker_model):
    pairs = all_pairs()
    want, want_ids = card_scores(spread_reranker_model, pairs)
    got, ids, truncated = ours(reranker, spread_reranker_model, pairs, share_prefix=False)
    assert ids == want_ids
    assert not truncated.any()
    assert want.max() - want.min() > 0.3, "scores should spread, or the tolerance proves little"
    assert np.abs(got - want).max() <= 1e-5


def test_shared_prefix_scores_match_the_card(reranker, spread_reranker_model):
    pairs = all_pairs()
    group = np.repeat(np.arange(len(QUERIES)), len(DOCUMENTS))
    want, _ = card_scores(spread_reranker_model, pairs)
    got, _, _ = ours(reranker, spread_reranker_model, pairs, group=group)
    assert np.abs(got - want).max() <= 1e-5


def test_truncated_pairs_match_the_card_and_keep_the_suffix(reranker, spread_reranker_model):
    pairs = [(QUERIES[0], LONG), (QUERIES[1], DOCUMENTS[0]), (QUERIES[3], LONG[::-1])]
    want, want_ids = card_scores(spread_reranker_model, pairs, max_length=96)
    got, ids, truncated = ours(reranker, spread_reranker_model, pairs, max_length=96, share_prefix=False)
    suffix = AutoTokenizer.from_pretrained(spread_reranker_model).encode(CARD_SUFFIX, add_special_tokens=False)
    assert ids == want_ids
    assert truncated.tolist() == [True, False, True]
    assert len(ids[0]) == 96 and len(ids[2]) == 96 and len(ids[1]) < 96
    assert all(x[-len(suffix):] == suffix for x in ids)
    assert np.abs(got - want).max() <= 1e-5


def _candidates():
    """Three queries × six candidates of uneven lengths, rows of different queries interleaved."""
    docs = [DOCUMENTS[i % len(DOCUMENTS)][: 20 + 37 * i] for i in range(6)] + [LONG[:400]]
    pairs, group = [], []
    for i, d in enumerate(docs):
        for g, q in enumerate(QUERIES[:3]):
            pairs.append((q, d if g != 1 else d[::-1]))
            group.append(g)
    return pairs, np.array(group)


def test_prefix_sharing_equals_the_plain_path_across_micro_batches(reranker, spread_reranker_model):
    pairs, group = _candidates()
    plain, ids, _ = ours(reranker, spread_reranker_model, pairs, budget=400, share_prefix=False)
    calls = []
    forward = reranker._forward_after_prefix
    reranker._forward_after_prefix = lambda kv, n, rests: calls.append(len(rests)) or forward(kv, n, rests)
    reranker.stats.__init__()
    try:
        shared, _, _ = ours(reranker, spread_reranker_model, pairs, group=group, budget=400)
    finally:
        del reranker._forward_after_prefix
    assert reranker.stats.shared_groups == 3
    assert len(calls) > 3 and sum(calls) == len(pairs)
    assert reranker.stats.prefix_tokens_saved > 0
    assert reranker.stats.padded_tokens < reranker.stats.real_tokens
    assert np.abs(shared - plain).max() <= 1e-5
    again, _, _ = ours(reranker, spread_reranker_model, pairs, group=group, budget=400)
    assert np.array_equal(again, shared)


def test_duplicate_candidates_and_singleton_groups_are_scored(reranker, spread_reranker_model):
    pairs = [(QUERIES[0], DOCUMENTS[0])] * 3 + [(QUERIES[1], DOCUMENTS[1])]
    group = np.array(["q0", "q0", "q0", "q1"])
    want, ids = card_scores(spread_reranker_model, pairs)
    assert common_prefix_length([np.array(x) for x in ids[:3]]) == len(ids[0]) - 1
    reranker.stats.__init__()
    got, _, _ = ours(reranker, spread_reranker_model, pairs, group=group)
    assert reranker.stats.shared_groups == 1
    assert np.abs(got - want).max() <= 1e-5


def test_a_pair_alone_equals_it_in_a_batch(reranker, spread_reranker_model):
    pairs, group = _candidates()
    batched, _, _ = ours(reranker, spread_reranker_model, pairs, group=group, budget=600)
    for i in range(0, len(pairs), 4):
        alone, _, _ = ours(reranker, spread_reranker_model, [pairs[i]], group=group[i : i + 1])
        assert abs(alone[0] - batched[i]) <= 1e-5


@pytest.mark.parametrize("share_prefix", [False, True])
def test_input_order_is_restored(reranker, spread_reranker_model, share_prefix):
    pairs, group = _candidates()
    forward, _, _ = ours(reranker, spread_reranker_model, pairs, group=group, budget=500, share_prefix=share_prefix)
    backward, _, _ = ours(reranker, spread_reranker_model, pairs[::-1], group=group[::-1], budget=500,
                          share_prefix=share_prefix)
    assert np.abs(backward[::-1] - forward).max() <= 1e-5
    one, _, _ = ours(reranker, spread_reranker_model, [pairs[5]])
    assert abs(one[0] - forward[5]) <= 1e-5


def test_the_fast_path_never_computes_vocabulary_logits(reranker, spread_reranker_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("lm_head ran: full-vocabulary logits were computed")

    monkeypatch.setattr(reranker.model.lm_head, "forward", refuse)
    with pytest.raises(AssertionError, match="lm_head ran"):
        reranker.model(input_ids=torch.tensor([[1, 2, 3]]))
    pairs, group = _candidates()
    want, _ = card_scores(spread_reranker_model, pairs[:6])
    for share_prefix in (False, True):
        got, _, _ = ours(reranker, spread_reranker_model, pairs[:6], group=group[:6], share_prefix=share_prefix)
        assert np.abs(got - want).max() <= 1e-5


def test_flat_values_and_offsets_are_accepted(reranker, spread_reranker_model):
    pairs = all_pairs()[:5]
    as_lists, ids, _ = ours(reranker, spread_reranker_model, pairs)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
    values = np.concatenate([np.array(x, dtype=np.int32) for x in ids])
    assert np.array_equal(reranker.score_ids((values, offsets)), as_lists)


def test_empty_rows_score_nan_without_model_work(reranker, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(reranker.base, "forward", refuse)
    reranker.stats.__init__()
    out = reranker.score_ids([[], []], np.array([0, 0]))
    assert out.dtype == np.float32 and np.isnan(out).all()
    assert reranker.stats.rows == 0


def test_replica_scores_rows_skips_rejects_and_keeps_columns(spread_reranker_model):
    pairs, _ = _candidates()
    pairs = pairs[:7]
    table = pa.table({
        "id": [f"r{i}" for i in range(9)],
        "query_id": ["a", "b", "c", "a", "b", "c", "a", None, "a"],
        "query": [q for q, _ in pairs] + [QUERIES[0], QUERIES[0]],
        "text": [d for _, d in pairs] + [LONG, None],
        "_reject": [None, None, "too_long", None, None, None, None, None, "null_text"],
    })
    replica = RerankReplica(RerankSettings(path=spread_reranker_model, dtype="float32", max_length=96,
                                           max_batch_tokens=300))
    out = replica(table)
    assert out.column_names == ["id", "query_id", "_reject", "score", "n_tokens", "truncated", "_replica_startup"]
    assert out.schema.field("score").type == pa.float32()
    assert out.schema.field("n_tokens").type == pa.int32()
    assert out.schema.field("truncated").type == pa.bool_()
    scores = out.column("score").to_numpy()
    n_tokens = out.column("n_tokens").to_numpy()
    keep = [0, 1, 3, 4, 5, 6, 7]
    assert np.isnan(scores[[2, 8]]).all() and (n_tokens[[2, 8]] == 0).all()
    assert replica.reranker.stats.rows == len(keep)
    assert replica.reranker.stats.shared_groups >= 1
    kept_pairs = [(table.column("query")[i].as_py(), table.column("text")[i].as_py()) for i in keep]
    want, want_ids = card_scores(spread_reranker_model, kept_pairs, max_length=96)
    assert np.abs(scores[keep] - want).max() <= 1e-5
    assert n_tokens[keep].tolist() == [len(x) for x in want_ids]
    truncated = out.column("truncated").to_pylist()
    assert truncated[7] is True and truncated[0] is False and truncated[2] is False


def test_a_max_length_without_room_for_the_pair_is_refused(spread_reranker_model):
    with pytest.raises(ModelLoadError, match="max_length=48 leaves no room"):
        PairTokenizer(spread_reranker_model, None, 48, None)


def test_a_group_of_the_wrong_length_is_refused(reranker):
    with pytest.raises(ValueError, match="group has 1 keys for 2 sequences"):
        reranker.score_ids([[1, 2], [3]], np.array([0]))
