"""The tokenizer spec is transformers' own, cached by content, and a driver with a cached spec never imports
torch or transformers (the replica classes it names are torch-free shells)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

from actors.tokenizer_cache import SPECS_DIR, cached_spec
from common.model_cache import is_weight_file

REPO = pathlib.Path(__file__).resolve().parents[2]


def _transformers_spec(path) -> str:
    """Independent of the cache: what transformers itself builds for `path`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer.to_str()


def _tokenizer_copy(src, dst) -> pathlib.Path:
    dst.mkdir()
    for f in pathlib.Path(src).iterdir():
        if not is_weight_file(f.name):
            shutil.copy(f, dst / f.name)
    return dst


def test_the_spec_is_built_once_per_content_and_rebuilt_when_a_file_changes(tiny_embedding_model, tmp_path):
    cache, builds = tmp_path / "cache", []

    def build(path):
        builds.append(path)
        return _transformers_spec(path)

    model = str(tiny_embedding_model)
    first = cached_spec(model, None, lambda: build(model), str(cache))
    assert first == _transformers_spec(model) and len(builds) == 1
    assert cached_spec(model, None, lambda: build(model), str(cache)) == first and len(builds) == 1  # a hit
    same = str(_tokenizer_copy(model, tmp_path / "same-files"))  # same bytes elsewhere: the same spec
    assert cached_spec(same, None, lambda: build(same), str(cache)) == first and len(builds) == 1
    assert cached_spec(model, "another-revision", lambda: build(model), str(cache)) == first and len(builds) == 2

    changed = _tokenizer_copy(model, tmp_path / "changed")
    tokenizer = json.loads((changed / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][-1], "id": tokenizer["added_tokens"][-1]["id"] + 1,
                                      "content": "<|embedrank_test|>"})
    (changed / "tokenizer.json").write_text(json.dumps(tokenizer))
    spec = cached_spec(str(changed), None, lambda: build(str(changed)), str(cache))
    assert len(builds) == 3 and spec != first and "<|embedrank_test|>" in spec and spec == _transformers_spec(changed)
    assert len(list((cache / SPECS_DIR).iterdir())) == 3  # entries only: no temporary file left


def test_a_hub_id_or_an_unwritable_cache_only_costs_the_build(tmp_path):
    assert cached_spec("Qwen/Qwen3-Embedding-0.6B", None, lambda: "hub", str(tmp_path / "c")) == "hub"
    assert not (tmp_path / "c").exists()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache's folder would be")
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    assert cached_spec(str(model), None, lambda: "built", str(blocked)) == "built"
    assert blocked.read_text() == "a file where the cache's folder would be"


DRIVER = r"""
import sys
from pipelines.cli import main
import pipelines.embed.job, pipelines.embed.graph, pipelines.rerank.job, pipelines.rerank.graph, pipelines.reindex.job
from actors.tokenize import tokenizer_spec
spec = tokenizer_spec(sys.argv[1])
print(len(spec), sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_a_driver_with_a_cached_spec_imports_neither_torch_nor_transformers(tiny_embedding_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "EMBEDRANK_MODEL_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-c", DRIVER, str(tiny_embedding_model)]
    cold = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    warm = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr + warm.stderr
    size = str(len(_transformers_spec(tiny_embedding_model)))
    assert cold.stdout.split()[0] == size and "'transformers'" in cold.stdout  # the miss built it with transformers
    assert warm.stdout.strip() == f"{size} []"  # the hit: the same spec, and no torch, no transformers
