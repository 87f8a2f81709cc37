"""Config loading: YAML fills a strict schema, --set overrides, errors name file and field."""

import pathlib

import pytest

from actors.rerank_prompts import DEFAULT_INSTRUCTION
from actors.settings import EmbedSettings, RerankSettings
from pipelines.config import ConfigError, load_config
from pipelines.embed.config import EmbedJobConfig
from pipelines.rerank.config import RerankJobConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
MINIMAL = """
input: {paths: ["/data/*.parquet"]}
model: {path: Qwen/Qwen3-Embedding-0.6B}
output: {path: /out}
"""


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_of_the_public_keys(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), schema=EmbedJobConfig)
    assert cfg.input.format == "parquet" and cfg.input.id_column is None and cfg.input.text_column == "text"
    assert cfg.model.max_length == 8192 and cfg.model.dtype == "auto" and cfg.model.dimensions is None
    assert cfg.model.instruction is None and cfg.output.vector_dtype == "float32"
    assert (cfg.compute.min_replicas, cfg.compute.max_replicas, cfg.compute.num_cpus, cfg.compute.num_gpus) == (
        "auto", "auto", "auto", 0)  # fitted to the cluster at start: pipelines.resources


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["output.path=s3://b/v1", "model.dimensions=256",
                                                 "compute.max_replicas=4", "model.instruction=null",
                                                 "input.paths=[a.parquet, b.parquet]"], schema=EmbedJobConfig)
    assert cfg.output.path == "s3://b/v1" and cfg.model.dimensions == 256 and cfg.compute.max_replicas == 4
    assert cfg.input.paths == ["a.parquet", "b.parquet"]


@pytest.mark.parametrize("override, field", [
    ("model.dimensions=0", "model.dimensions"),
    ("input.format=csv", "input.format"),
    ("model.dtype=int8", "model.dtype"),
    ("output.vector_dtype=float64", "output.vector_dtype"),
    ("model.pathz=x", "model.pathz"),
    ("compute={min_replicas: 3, max_replicas: 2}", "compute"),
])
def test_errors_name_the_file_and_the_field(tmp_path, override, field):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override], schema=EmbedJobConfig)
    assert str(path) in str(err.value) and field in str(err.value)


def test_missing_required_sections_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(write(tmp_path, "input: {paths: [x]}\noutput: {path: o}\n"), schema=EmbedJobConfig)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml", schema=EmbedJobConfig)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "input: [unclosed\n"), schema=EmbedJobConfig)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, MINIMAL), ["output.path"], schema=EmbedJobConfig)


@pytest.mark.parametrize("root", [EmbedJobConfig, RerankJobConfig])
def test_every_field_is_described(root):
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            for candidate in (ann, *getattr(ann, "__args__", ())):
                if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                    walk(candidate)

    walk(root)


@pytest.mark.parametrize("name, schema", [("demo.yaml", EmbedJobConfig), ("demo-vectors.yaml", EmbedJobConfig),
                                          ("backfill.yaml", EmbedJobConfig),
                                          ("rerank.yaml", RerankJobConfig)])
def test_shipped_configs_validate(name, schema):
    load_config(REPO / "configs" / name, schema=schema)


def test_rerank_config_needs_exactly_one_text_source(tmp_path):
    base = "model: {path: m}\noutput: {path: o}\n"
    cfg = load_config(write(tmp_path, base + "input: {paths: [c]}\n"), schema=RerankJobConfig)
    assert cfg.model.instruction.startswith("Given a web search query") and cfg.output.top_k is None
    with pytest.raises(ConfigError, match="documents` must say where document texts are"):
        load_config(write(tmp_path, base + "input: {paths: [c], text_column: null}\n"), schema=RerankJobConfig)
    with pytest.raises(ConfigError, match="set input.text_column: null"):
        load_config(write(tmp_path, base + "input: {paths: [c]}\ndocuments: {paths: [d]}\n"),
                    schema=RerankJobConfig)
    with pytest.raises(ConfigError, match="output.top_k"):
        load_config(write(tmp_path, base + "input: {paths: [c]}\n"), ["output.top_k=0"], schema=RerankJobConfig)


def test_null_storage_options_fall_back_to_the_inputs_and_replicas_get_typed_settings(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["input.storage_options={endpoint_url: http://s3}",
                                                 "output.storage_options={anon: true}", "compute.num_cpus=3",
                                                 "model.dimensions=32", "output.vector_dtype=float16"],
                      schema=EmbedJobConfig)
    assert cfg.model_storage_options == {"endpoint_url": "http://s3"} and cfg.output_storage_options == {"anon": True}
    assert cfg.replica_settings("digest") == EmbedSettings(
        path="Qwen/Qwen3-Embedding-0.6B", num_cpus=3, storage_options={"endpoint_url": "http://s3"},
        model_digest="digest", dimensions=32, vector_dtype="float16")
    rerank = load_config(write(tmp_path, "input: {paths: [c]}\nmodel: {path: m, max_length: 96}\noutput: {path: o}\n"),
                         schema=RerankJobConfig)
    assert rerank.replica_settings(None) == RerankSettings(path="m", storage_options={}, max_length=96,
                                                           instruction=DEFAULT_INSTRUCTION)
