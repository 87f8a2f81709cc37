"""The repository's shape and its deployment files are valid."""

import json
import pathlib

import jsonschema
import pytest
import ray.autoscaler
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_launcher_schema():
    schema = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0


@pytest.mark.parametrize("package", ["actors", "pipelines"])
def test_room_boundaries(package):
    forbidden = {"actors": ("import ray", "from ray"), "pipelines": ("import torch", "from torch",
                                                                    "import transformers", "from transformers")}
    for path in (REPO / package).rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.strip().startswith(forbidden[package]), f"{path}: {line.strip()}"
