"""Model loading is safe: safetensors only, no remote code, clear errors."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from actors.loading import load_model, resolve_dtype
from actors.settings import dtype_name
from common.errors import ModelLoadError


def test_a_directory_with_only_pickle_weights_is_refused(tiny_embedding_model, tmp_path):
    unsafe = tmp_path / "pickled"
    shutil.copytree(tiny_embedding_model, unsafe)
    state = load_file(str(unsafe / "model.safetensors"))
    (unsafe / "model.safetensors").unlink()
    torch.save(state, unsafe / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(unsafe), None, torch.float32, torch.device("cpu"))


def test_remote_code_is_never_trusted(tiny_embedding_model, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(tiny_embedding_model, remote)
    config = (remote / "config.json").read_text().replace(
        '"model_type"', '"auto_map": {"AutoModel": "evil.EvilModel"}, "model_type"', 1)
    (remote / "config.json").write_text(config)
    (remote / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    model = load_model(str(remote), None, torch.float32, torch.device("cpu"))
    assert type(model).__module__.startswith("transformers.")


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


def test_one_rule_for_auto_dtype_on_either_device():
    assert dtype_name("auto", on_gpu=True) == "bfloat16" and dtype_name("auto", on_gpu=False) == "float32"
    assert dtype_name("float16", on_gpu=False) == "float16"
    assert resolve_dtype("auto", torch.device("cpu")) is getattr(torch, dtype_name("auto", on_gpu=False))


def test_a_replica_refuses_another_architecture_before_loading_it(tmp_path):
    """Hub ids skip the driver's preflight (their config.json is not fetched there): the replica's load checks."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"is a bert model \(BertModel\); embed implements the pooling and "
                                             r"prompts of Qwen3 only"):
        load_model(str(tmp_path), None, torch.float32, torch.device("cpu"))
