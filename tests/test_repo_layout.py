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


def test_cluster_yaml_is_locked_down_and_installs_this_project():
    from ray.util.accelerators import accelerators

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    # the head runs the driver only: no CPU (no read/tokenize/write tasks) and no GPU for Ray to schedule
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0
    assert config["max_workers"] > 0 and config["idle_timeout_minutes"] > 0
    for t in workers.values():
        assert t["min_workers"] == 0 and t["max_workers"] > 0  # every worker scales from (and back to) zero
    # GPU types advertise the accelerator type that compute.accelerator_type asks for, in Ray's own names
    known = {v for k, v in vars(accelerators).items() if k.startswith("NVIDIA_")}
    declared = {r.split(":", 1)[1] for t in workers.values() for r in t["resources"]
                if r.startswith("accelerator_type:")}
    assert {"L4", "A100"} <= declared <= known, declared
    # nothing but SSH from outside; the dashboard/job server on loopback, reached through `ray dashboard`
    assert config["provider"]["security_group"]["IpPermissions"] == []
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in " ".join(starts)
    # token auth on every node, the local token shipped to each
    assert len(ray_starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in ray_starts)
    assert any("export RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    # this repository is mounted and installed (editable) on the head and on every worker type
    assert config["file_mounts"]["~/embedrank"] == "."
    install = "pip install --quiet -e ~/embedrank"
    assert install in config["head_setup_commands"]
    for t in workers.values():
        assert install in t.get("worker_setup_commands", config["worker_setup_commands"])


@pytest.mark.parametrize("package", ["actors", "pipelines"])
def test_room_boundaries(package):
    forbidden = {"actors": ("import ray", "from ray"), "pipelines": ("import torch", "from torch",
                                                                    "import transformers", "from transformers")}
    for path in (REPO / package).rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.strip().startswith(forbidden[package]), f"{path}: {line.strip()}"


TORCH_FREE_STAGE_MODULES = ["pipelines.embed.stages", "pipelines.input.reading", "pipelines.output.pieces",
                            "pipelines.reindex.stages", "pipelines.rerank.joining", "pipelines.rerank.ranking"]


def test_cpu_task_stages_never_load_torch_or_transformers():
    """Ray imports a task function's module in each worker that runs it: these hold every CPU stage
    (read, tokenize, reindex diff and carry, join, rank, write), so those workers stay ~400 MiB lighter."""
    import subprocess
    import sys

    code = (f"import sys\nfor m in {TORCH_FREE_STAGE_MODULES!r}: __import__(m)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_task_functions_of_the_graph_live_in_torch_free_modules():
    import pipelines.graph as graph

    stages = {"read_and_tokenize", "write_pieces", "carry_or_tokenize", "read_hash_and_tokenize", "count_changes",
              "read_with_hash", "read_snapshot_keys", "read_base_keys", "read_base_vectors", "read_items",
              "read_documents", "order_joined_item", "read_score_files", "rank_bucket"}
    for name in stages:
        assert getattr(graph, name).__module__ in TORCH_FREE_STAGE_MODULES, name
