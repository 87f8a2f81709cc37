"""The repository's shape and its deployment files are valid."""

import ast
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


# --- which room may import what: parsed from the code, not grepped -------------------------------------------

ROOMS = ("actors", "common", "pipelines")
# room → top-level packages it must never import (a dotted prefix matches the package and everything under it)
FORBIDDEN = {
    "actors": ("pipelines", "ray"),                                  # replica code: no jobs, no Ray
    "common": ("actors", "pipelines", "ray", "torch", "transformers"),  # the bottom package imports neither room
    "pipelines": ("torch", "transformers"),                          # jobs: the models live in actors/
}
DYNAMIC_IMPORTS = {"import_module", "__import__"}


def module_name(path: pathlib.Path) -> tuple[str, bool]:
    """(dotted module name, whether it is a package's __init__) of a file under the repository root."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module that `source` (the text of `module`) imports, as absolute dotted names, wherever the
    statement sits (module level, functions, classes, try/if blocks): `import a.b as c` gives a.b; `from a
    import b` gives a and a.b (b may be a module); relative imports are resolved against the module's package,
    the repository root being the top (as `ray job submit --working-dir .` ships it); `importlib.import_module`
    and `__import__` with a literal name count too."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > len(package):
                    raise ValueError(f"{module}: `from {'.' * node.level}{node.module or ''} import ...` "
                                     "climbs above the repository root")
                base = ".".join(package[:len(package) - up] + ([node.module] if node.module else []))
            else:
                base = node.module
            if base:
                found.add(base)
            found.update(f"{base}.{a.name}" if base else a.name for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DYNAMIC_IMPORTS and not node.args[0].value.startswith("."):
                found.add(node.args[0].value)
    return found


def violations(room: str, imported: set[str]) -> list[str]:
    return sorted(m for m in imported for top in FORBIDDEN[room] if m == top or m.startswith(top + "."))


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_what_its_place_allows(room):
    """actors/ never imports pipelines/ or ray; common/ neither room nor ray, torch, transformers; pipelines/
    never torch or transformers (those load in the replica only)."""
    files = sorted((REPO / room).rglob("*.py"))
    assert files, f"{room}/ holds no Python files"
    found = {}
    for path in files:
        module, is_package = module_name(path)
        bad = violations(room, imported_modules(path.read_text(encoding="utf-8"), module, is_package))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    assert not found, f"{room}/ imports what it must not: {found}"


def test_the_output_room_never_reaches_up_into_a_jobs_package():
    """pipelines/output/ sits below the jobs: it follows an index's pointer through its own read side
    (`output.index_pointer`) and never imports pipelines.embed, rerank, reindex, the lifecycle or the CLI."""
    above = ("pipelines.embed", "pipelines.rerank", "pipelines.reindex", "pipelines.lifecycle", "pipelines.cli")
    found = {}
    for path in sorted((REPO / "pipelines" / "output").rglob("*.py")):
        module, is_package = module_name(path)
        bad = sorted(m for m in imported_modules(path.read_text(encoding="utf-8"), module, is_package)
                     for top in above if m == top or m.startswith(top + "."))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    assert not found, f"pipelines/output/ imports a job's package: {found}"


RAY_MODULES = {"pipelines/graph.py": "wires every Ray Data graph", "pipelines/ray_runtime.py": "starts or joins Ray",
               "pipelines/watchdog.py": "watches a running pipeline", "pipelines/ray_quiet.py": "quiets Ray's output",
               "pipelines/cluster_view.py": "reads what the Ray offers and waits for"}


def test_one_place_builds_ray_graphs():
    """Job packages compose graphs from `pipelines.graph` and never touch Ray themselves."""
    found = set()
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        module, is_package = module_name(path)
        if any(m == "ray" or m.startswith("ray.") for m in imported_modules(path.read_text(), module, is_package)):
            found.add(str(path.relative_to(REPO)))
    assert found == set(RAY_MODULES), found


def pipelines_import_graph() -> dict[str, set[str]]:
    """Every module under pipelines/ → the modules under pipelines/ it imports (parsed, as above)."""
    imports = {}
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        module, is_package = module_name(path)
        imports[module] = imported_modules(path.read_text(encoding="utf-8"), module, is_package)
    return {m: {i for i in found if i in imports and i != m} for m, found in imports.items()}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (its modules in import order, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            if (cycle := visit(imported)) is not None:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m)) is not None), None)


def reaches(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every module `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for imported in graph[todo.pop()] - seen:
            seen.add(imported)
            todo.append(imported)
    return seen


def test_no_import_cycle_among_the_pipelines_modules():
    """Modules import downwards only (a lazy import inside a function counts too): a cycle means two modules
    that cannot be read, tested or moved apart, e.g. the compute fitting and the Ray runtime calling each
    other."""
    cycle = import_cycle(pipelines_import_graph())
    assert cycle is None, " -> ".join(cycle)
    # and the search does find one
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set()}) is None


def test_compute_fitting_and_progress_stay_below_what_they_are_handed():
    """`pipelines.resources` decides from a view it is handed and reaches no module that touches Ray (nor the
    runtime's neighbours); `pipelines.progress` counts what it is handed and reaches nothing in the output
    room."""
    graph = pipelines_import_graph()
    ray_touching = {module_name(REPO / path)[0] for path in RAY_MODULES}
    assert "pipelines.ray_runtime" in ray_touching and "pipelines.cluster_view" in ray_touching
    resources = reaches(graph, "pipelines.resources")
    assert not resources & (ray_touching | {"pipelines.driver_session"}), resources
    progress = reaches(graph, "pipelines.progress")
    assert not {m for m in progress if m == "pipelines.output" or m.startswith("pipelines.output.")}, progress
    # the driver's stop handling needs no Ray: it reaches no module that touches Ray (and is not one itself,
    # `test_one_place_builds_ray_graphs`)
    assert not reaches(graph, "pipelines.driver_session") & ray_touching


def test_the_import_parser_catches_every_spelling():
    """The check above can fail: imports hidden in functions, aliased, relative or dynamic are all seen."""
    source = """
import os
import ray.data as rd
from actors import pooling

def late():
    from pipelines.output import root
    return root

class Replica:
    def __init__(self):
        from ..pipelines import x
        from .. import pipelines
        from . import batching
        from .sub.deep import thing
        import importlib
        importlib.import_module("pipelines.graph")
        __import__("ray")

try:
    import transformers.models.qwen3 as q
except ImportError:
    pass
"""
    found = imported_modules(source, "actors.replica")
    assert {"os", "ray.data", "actors", "actors.pooling", "pipelines.output", "pipelines.output.root",
            "pipelines", "pipelines.x", "actors.batching", "actors.sub.deep", "actors.sub.deep.thing",
            "pipelines.graph", "ray", "transformers.models.qwen3"} <= found, found
    assert violations("actors", found) == ["pipelines", "pipelines.graph", "pipelines.output",
                                           "pipelines.output.root", "pipelines.x", "ray", "ray.data"]
    # relative imports resolve against the package: inside a package's __init__, `.` is the package itself
    assert imported_modules("from .stages import f", "pipelines.embed", is_package=True) == {
        "pipelines.embed.stages", "pipelines.embed.stages.f"}
    assert imported_modules("from ..common import errors", "pipelines.embed.job") == {
        "pipelines.common", "pipelines.common.errors"}
    assert violations("common", imported_modules("from ..actors import embedder", "common.model_cache")) == [
        "actors", "actors.embedder"]
    assert violations("pipelines", imported_modules("import torch.nn as nn", "pipelines.graph")) == ["torch.nn"]
    assert violations("pipelines", imported_modules("import torchvision, transformersx", "pipelines.x")) == []
    with pytest.raises(ValueError, match="climbs above the repository root"):
        imported_modules("from ... import x", "actors.replica")


TORCH_FREE_STAGE_MODULES = ["pipelines.embed.stages", "pipelines.input.reading", "pipelines.output.pieces",
                            "pipelines.reindex.stages", "pipelines.rerank.joining", "pipelines.rerank.ranking",
                            "pipelines.stages"]


def test_cpu_task_stages_never_load_torch_or_transformers():
    """Ray imports a task function's module in each worker that runs it: these hold every CPU stage
    (read, tokenize, reindex diff and carry, join, rank, write), so those workers stay ~400 MiB lighter."""
    import subprocess
    import sys

    code = (f"import sys\nfor m in {TORCH_FREE_STAGE_MODULES!r}: __import__(m)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


GRAPH_MODULES = ["pipelines.graph", "pipelines.embed.graph", "pipelines.rerank.graph", "pipelines.reindex.graph"]


def test_task_functions_of_the_graph_live_in_torch_free_modules():
    import importlib

    found = {name: value for module in GRAPH_MODULES for name, value in vars(importlib.import_module(module)).items()
             if callable(value) and hasattr(value, "stage")}
    assert {"read_and_tokenize", "write_pieces", "carry_locally", "read_hash_and_tokenize", "diff_file",
            "digest_items", "read_items", "read_documents", "order_joined_item", "read_score_files",
            "rank_bucket"} <= set(found)
    for name, function in found.items():
        assert function.__module__ in TORCH_FREE_STAGE_MODULES, name
