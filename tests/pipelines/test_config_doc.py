"""The configuration reference is generated from the schema: the checked-in page is never stale, every key of
every job's config is on it, and `embedrank schema` prints a JSON Schema that validates the shipped configs."""

import json

import pytest
import yaml

from pipelines import config_doc
from pipelines.cli import main


def _keys(model, prefix=""):
    """Every dotted key of a pydantic model, walked here apart from config_doc's own walk."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        for kind, inner in _nested(field.annotation):
            out.extend(_keys(inner, f"{prefix}{name}{'[]' if kind == 'list' else ''}."))
    return out


def _nested(annotation, kind=""):
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield kind or "one", annotation
        return
    for arg in typing.get_args(annotation):
        yield from _nested(arg, "list" if typing.get_origin(annotation) is list else kind)


def test_the_checked_in_reference_is_what_the_schema_generates():
    assert config_doc.PAGE.read_text() == config_doc.render(), \
        "docs/configuration.md is stale: run `python -m pipelines.config_doc`"
    assert config_doc.main(["--check"]) == 0


@pytest.mark.parametrize("job", list(config_doc.CONFIGS))
def test_every_key_of_every_job_is_in_the_reference(job):
    page = config_doc.PAGE.read_text()
    section = page.split(f"## `embedrank {job}`")[1].split("\n## ")[0]
    keys = _keys(config_doc.config_type(job))
    assert len(keys) > 30
    for key in keys:
        assert f"| `{key}` |" in section, key
    # the keys the README's hand-kept table once missed
    for key in ("run.progress_interval_s", "run.stall_timeout_s", "run.startup_timeout_s", "run.ray_address",
                "compute.accelerator_type"):
        assert f"| `{key}` |" in section


def test_schema_command_prints_a_json_schema_that_checks_configs(capsys):
    import jsonschema  # Ray's dependency

    for job, config in (("embed", "configs/backfill.yaml"), ("rerank", "configs/rerank.yaml"),
                        ("reindex", "configs/reindex.yaml")):
        assert main(["schema", job]) == 0
        schema = json.loads(capsys.readouterr().out)
        assert schema["additionalProperties"] is False and "model" in schema["properties"]
        with open(config) as fh:
            data = yaml.safe_load(fh)
        jsonschema.validate(data, schema)
        data["model"]["dimension"] = 3  # a typo of model.dimensions: refused as the CLI refuses it
        with pytest.raises(jsonschema.ValidationError, match="dimension"):
            jsonschema.validate(data, schema)
