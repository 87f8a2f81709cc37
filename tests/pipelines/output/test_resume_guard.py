"""Resuming into an output made with other model settings is refused, naming the difference."""

import pytest

from pipelines.output.root import OutputRoot
from pipelines.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from common.errors import OutputError
from pipelines.fingerprint import embed_fingerprint, fingerprint_id
from pipelines.input.plan import make_plan
from pipelines.storage import Storage


def config(corpus, out, model, **model_extra):
    return EmbedJobConfig.model_validate({
        "input": {"paths": [str(corpus / "*.jsonl")], "format": "jsonl"},
        "model": {"path": str(model), **model_extra},
        "output": {"path": str(out)},
    })


@pytest.mark.parametrize("change, named", [
    ({"dimensions": 32}, "dimensions: None → 32"),
    ({"instruction": "Find it"}, "instruction: None → 'Find it'"),
    ({"revision": "v2"}, "revision: None → 'v2'"),
    ({"dtype": "bfloat16"}, "dtype: 'float32' → 'bfloat16'"),
    ({"max_length": 512}, "max_length: 8192 → 512"),
    ({"path": "OTHER"}, "model: "),
])
def test_changed_model_settings_are_refused(tmp_path, tiny_embedding_model, change, named):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    original = config(corpus, out, tiny_embedding_model)
    fingerprint = embed_fingerprint(original)
    OutputRoot(Storage(str(out))).prepare(fingerprint, fingerprint_id(fingerprint), make_plan(original.input).items,
                                          {})
    model = tmp_path / "other-model" if change.get("path") else tiny_embedding_model
    if change.get("path"):
        model.mkdir()
        (model / "config.json").write_text((tiny_embedding_model / "config.json").read_text())
        (model / "model.safetensors").write_bytes(b"x")
        change = {}
    with pytest.raises(OutputError, match="holds output of a different job") as err:
        run_embed(config(corpus, out, model, **change))
    assert named in str(err.value)
