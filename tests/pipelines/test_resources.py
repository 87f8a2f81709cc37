"""Compute fitted to the hardware: `auto` decisions and fail-fast refusals on fake node lists (no Ray), then the
real command refusing impossible requests within seconds, on the embedded local Ray and on a joined cluster."""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import job_process_env

from common.errors import ResourceError
from pipelines.config import ComputeConfig, ConfigError, load_config
from pipelines.embed.config import EmbedJobConfig
from pipelines.cluster_view import local_view
from pipelines.resources import ClusterView, check, describe_fit, fit, pending_line, read_only_monitor, size_pool

REPO = pathlib.Path(__file__).resolve().parents[2]


def machine(cpus: float, gpus: float = 0, kind: str | None = None) -> dict[str, float]:
    node = {"CPU": float(cpus), "memory": 8e9}
    if gpus:
        node["GPU"] = float(gpus)
    if kind:
        node[f"accelerator_type:{kind}"] = 1.0
    return node


def local(cpus: float, gpus: float = 0, kind: str | None = None) -> ClusterView:
    return ClusterView([machine(cpus, gpus, kind)], "none", local=True)


def fitted(view: ClusterView, **compute) -> tuple[int, int, float]:
    c = fit(ComputeConfig(**compute), view)
    assert not c.auto_fields
    return c.min_replicas, c.max_replicas, c.num_cpus


# --- `auto` ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cores, pool", [
    (1, (1, 1, 0.5)),    # one I/O task's share stays free
    (2, (1, 1, 1.0)),    # this machine, and the test session's Ray: as the old default, 1 CPU left for I/O
    (4, (1, 1, 3.0)),
    (16, (2, 2, 7.0)),   # 2 CPUs for I/O, 14 for two 7-thread replicas: no core idle
    (64, (7, 7, 8.0)),   # 8 for I/O, replicas of at most 8 threads
])
def test_cpu_replicas_use_the_cores_the_io_stages_leave(cores, pool):
    assert fitted(local(cores)) == pool


@pytest.mark.parametrize("cores, threads", [
    (1, 1),
    (2, 2),    # one replica on the node: its threads use the I/O tasks' CPU too (E8: 1.68× the embedding rate)
    (4, 4),
    (9, 8),    # 1 × 7 CPUs, at most 8 threads
    (16, 7),   # two replicas on the node: their own CPUs
    (64, 8),
])
def test_a_lone_cpu_replica_threads_take_the_io_reserve_too(cores, threads):
    c = fit(ComputeConfig(), local(cores))
    assert c.num_threads == threads and c.num_cpus <= threads
    assert fit(ComputeConfig(), ClusterView([machine(2), machine(2)], "none")).num_threads == 2
    assert fit(ComputeConfig(), ClusterView([machine(2), machine(16)], "none")).num_threads == 7  # 1 + 2 replicas
    assert fit(ComputeConfig(num_cpus=1), local(2)).num_threads == 1  # explicit CPUs: that many threads
    assert fit(ComputeConfig(num_threads=3), local(2)).num_threads == 3  # explicit threads win
    assert fit(ComputeConfig(num_gpus=1), local(2, gpus=1)).num_threads == 1  # ignored on a GPU


def test_gpu_replicas_one_per_gpu_with_a_cpu_each():
    assert fitted(local(16, gpus=4), num_gpus=1) == (4, 4, 1.0)
    assert fitted(local(16, gpus=4), num_gpus=0.5) == (8, 8, 1.0)
    assert fitted(local(2, gpus=2), num_gpus=1) == (2, 2, 0.5)  # 1 CPU stays with the I/O tasks
    two_types = ClusterView([machine(4), machine(8, 1, "L4"), machine(96, 8, "A100")], "none")
    assert fitted(two_types, num_gpus=1, accelerator_type="A100") == (1, 8, 1.0)


def test_explicit_values_win():
    assert fitted(local(16), num_cpus=2) == (7, 7, 2.0)
    assert fitted(local(16), max_replicas=4) == (4, 4, 3.0)
    assert fitted(local(16), min_replicas=1) == (1, 2, 7.0)
    assert fitted(local(2), min_replicas=3) == (3, 3, 1.0)  # refused by `check`, not silently lowered
    explicit = ComputeConfig(min_replicas=1, max_replicas=2, num_cpus=0.5, num_threads=1)
    assert fit(explicit, local(64)) is explicit


def test_on_a_joined_cluster_the_pool_starts_at_one_and_grows():
    fixed = ClusterView([machine(8), machine(8)], "none")
    assert fitted(fixed) == (1, 2, 7.0)
    assert fitted(ClusterView([machine(0), machine(4, 1, "L4")], "unknown"), num_gpus=1) == (1, 1, 1.0)


def test_the_choice_is_printed_in_one_line():
    before = ComputeConfig()
    line = describe_fit(before, fit(before, local(16, gpus=1)), local(16, gpus=1))
    assert line == ("compute: 2 model replicas × 7 CPUs (7 threads) each; auto: min_replicas, max_replicas, num_cpus, "
                    "num_threads; fitted to local Ray on this machine: 16 CPUs + 1 GPU; this Ray has 1 GPU: set "
                    "compute.num_gpus=1 to use them")
    assert describe_fit(before, fit(before, local(2)), local(2)).startswith(
        "compute: 1 model replica × 1 CPU (2 threads) each;")


def test_auto_is_validated_strictly(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: {paths: [x]}\nmodel: {path: m}\noutput: {path: o}\n")
    assert load_config(cfg, ["compute.num_cpus=2", "compute.max_replicas=auto"],
                       schema=EmbedJobConfig).compute.num_cpus == 2.0
    for override, message in [("compute.num_cpus=Auto", "compute.num_cpus: Input should be 'auto' or a valid number"),
                              ("compute.num_cpus=0", "compute.num_cpus: Input should be greater than 0"),
                              ("compute.min_replicas=1.5", "compute.min_replicas: Input should be a valid integer")]:
        with pytest.raises(ConfigError) as err:
            load_config(cfg, [override], schema=EmbedJobConfig)
        assert message in str(err.value) and "literal" not in str(err.value)


def test_this_machine_is_read_without_starting_ray():
    view = local_view()
    assert view.local and view.nodes[0]["CPU"] >= 1  # the autouse fixture fails this test if Ray started


# --- impossible requests are refused, naming the setting -----------------------------------------------------


def refusal(view: ClusterView, **compute) -> str:
    with pytest.raises(ResourceError) as err:
        check(fit(ComputeConfig(**compute), view), view)
    return str(err.value)


def test_a_gpu_on_a_machine_without_one():
    assert refusal(local(2), num_gpus=1) == ("compute.num_gpus=1, but this Ray cluster has no GPU (local Ray on this "
                                             "machine: 2 CPUs, no GPU)")
    assert refusal(local(8, 1), num_gpus=2).startswith("compute.num_gpus=2, but the largest GPU node of this Ray "
                                                       "cluster has 1 GPU")
    assert refusal(local(8, 1, "L4"), num_gpus=1, accelerator_type="A100").startswith(
        "compute.accelerator_type=A100, but this Ray cluster has no A100 accelerator (types found: L4)")


def test_cpus_beyond_a_node():
    assert refusal(local(2), num_cpus=3).startswith("compute.num_cpus=3, but the largest node of this Ray cluster "
                                                    "has 2 CPUs")
    cluster = ClusterView([machine(4), machine(16), machine(8, 1)], "none")
    assert "the largest node with the GPUs of this Ray cluster has 8 CPUs" in refusal(cluster, num_gpus=1, num_cpus=12)
    assert refusal(local(2), io_num_cpus=4).startswith("compute.io_num_cpus=4, but")


def test_a_replica_and_an_io_task_that_cannot_coexist():
    assert refusal(local(2), num_cpus=2).startswith(
        "compute.num_cpus=2 leaves no CPU for the read, tokenize and write tasks (compute.io_num_cpus=0.5 each): "
        "a replica and one of them need 2.5 CPUs on this Ray cluster")
    assert refusal(local(2), num_cpus=1, min_replicas=2).startswith(
        "compute.min_replicas=2 replicas of 1 CPU each do not fit on this Ray cluster beside one read, tokenize or "
        "write task")
    # a second node can run the I/O tasks: nothing to refuse
    check(fit(ComputeConfig(num_cpus=2), ClusterView([machine(2), machine(1)], "none")),
          ClusterView([machine(2), machine(1)], "none"))


def test_with_an_autoscaler_its_node_types_are_what_counts():
    now = [machine(4)]  # only the CPU head is up; GPU nodes come when asked for
    types = ClusterView(now, "types", [machine(4, 1, "L4"), machine(96, 8, "A100")])
    check(fit(ComputeConfig(num_gpus=1, accelerator_type="A100", num_cpus=8), types), types)
    assert refusal(types, num_gpus=1, accelerator_type="H100").startswith(
        "compute.accelerator_type=H100, but this Ray cluster or a node type of its autoscaler has no H100")
    assert "has 96 CPUs" in refusal(types, num_gpus=1, num_cpus=128)
    unknown = ClusterView(now, "unknown")  # the cluster launcher's autoscaler does not expose its node types
    check(fit(ComputeConfig(num_gpus=1, num_cpus=128), unknown), unknown)


def test_on_an_autoscaling_cluster_the_pool_asks_at_once_for_what_the_items_left_can_use():
    """The pool's minimum on a cluster whose autoscaler adds nodes is min(max_replicas, items left), never below the
    user's min_replicas; a resume with one item left asks for one replica's node, not max_replicas nodes; a Ray
    without an autoscaler keeps min_replicas."""
    compute = ComputeConfig(num_gpus=1, min_replicas=1, max_replicas=4, num_cpus=1, num_threads=1)
    said = io.StringIO()
    assert size_pool(compute, "types", 100, said).min_replicas == 4
    assert "asks for 4 replica(s) at once (min_replicas 1 -> 4; 100 item(s) to process" in said.getvalue()
    assert size_pool(compute, "types", 3, io.StringIO()).min_replicas == 3
    quiet = io.StringIO()
    assert size_pool(compute, "types", 1, quiet) is compute and quiet.getvalue() == ""  # the resume's last item
    assert size_pool(compute.model_copy(update={"min_replicas": 2}), "types", 1, io.StringIO()).min_replicas == 2
    assert size_pool(compute, "none", 100, io.StringIO()).min_replicas == 1


def test_the_read_only_monitor_means_a_fixed_cluster():
    node = "4a0a2f86da8b7dad7d54f071bb9dcec4f92b4cb74f2b128d6fe9e33e"
    assert read_only_monitor({"autoscaler_report": {"node_type_mapping": {node: f"node_{node}"}}})
    assert not read_only_monitor({"autoscaler_report": {"node_type_mapping": {node: "ray.head.default"}}})
    assert not read_only_monitor({})


def test_what_an_autoscaled_job_waits_for_is_one_line():
    status = {"load_metrics_report": {"resource_demand": [[{"CPU": 1.0, "GPU": 1.0}, 2]]},
              "autoscaler_report": {"pending_launches": {"gpu_worker": 1}, "pending_nodes": []}}
    assert pending_line(status) == ("waiting for the cluster: 2 × {CPU: 1, GPU: 1} pending; autoscaler launching "
                                    "gpu_worker × 1")
    status["autoscaler_report"]["pending_launches"] = {}
    assert "no node is being launched for it" in pending_line(status)
    assert pending_line({"load_metrics_report": {"resource_demand": []}}) is None


# --- progress: a bar on a terminal, lines elsewhere ----------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    from pipelines.output.records import ItemCommit
    from pipelines.progress import Progress, emit, end_line

    commit = ItemCommit(item="i", fingerprint_id="f", source="a.parquet", row_start=0, row_end=10, rows=10, tokens=100)
    tty = Terminal()
    bar = Progress(3, 0, 30, interval=60, stream=tty)
    bar._last -= 1
    bar.update(commit)
    emit(tty, "a line of its own")
    bar._last -= 1
    bar.update(commit)
    end_line()
    text = tty.getvalue()
    assert text.startswith("\r[embed] items 1/3") and "\r\x1b[Ka line of its own\n\r[embed] items 2/3" in text
    assert text.endswith("\n") and text.count("\n") == 2
    plain = io.StringIO()
    lines = Progress(3, 0, 30, interval=0, stream=plain)
    lines.update(commit)
    lines.update(commit)
    assert plain.getvalue().count("\n") == 2 and "\r" not in plain.getvalue() and "\x1b" not in plain.getvalue()


# --- the real command refuses within seconds -----------------------------------------------------------------


@pytest.fixture
def job_config(tmp_path, tiny_embedding_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["one", "two"]}), corpus / "a.parquet")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {{paths: ['{corpus}/*.parquet'], id_column: doc_id}}\n"
                   f"model: {{path: '{tiny_embedding_model}', max_length: 32}}\n"
                   f"output: {{path: '{tmp_path / 'out'}'}}\n")
    return cfg, tmp_path / "out"


def run_refused(cfg: pathlib.Path, *overrides: str) -> tuple[str, float]:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "embed", str(cfg),
                             *(a for o in overrides for a in ("--set", o))], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**job_process_env(), "RAY_AUTH_MODE": "disabled"})
    try:
        _, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.terminate()  # a clean stop: its output says where it waited
        raise AssertionError(f"not refused in 90 s: {proc.communicate(timeout=60)[1]}") from None
    took = time.monotonic() - started
    assert proc.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("embedrank: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0].removeprefix("embedrank: error: "), took


@pytest.mark.slow
@pytest.mark.parametrize("request_, message", [
    ("gpu", "compute.num_gpus=1, but this Ray cluster has no GPU (local Ray on this machine: "),
    ("beyond", "but the largest node of this Ray cluster has"),
    ("all", "leaves no CPU for the read, tokenize and write tasks"),
])
def test_the_embedded_ray_refuses_an_impossible_request_in_seconds(job_config, request_, message):
    cfg, out = job_config
    cores = local_view().nodes[0]["CPU"]
    override = {"gpu": "compute.num_gpus=1", "beyond": f"compute.num_cpus={cores + 1:g}",
                "all": f"compute.num_cpus={cores:g}"}[request_]
    error, took = run_refused(cfg, override)
    assert message in error and took < 60, (error, took)
    assert not out.exists()  # refused before the lock: no output touched, no Ray started


def test_a_joined_fixed_cluster_refuses_too(session_ray, job_config):
    from pipelines.cluster_view import _autoscaling_status

    deadline = time.monotonic() + 60
    while not read_only_monitor(_autoscaling_status()) and time.monotonic() < deadline:  # reported seconds in
        time.sleep(0.5)
    cfg, out = job_config
    error, took = run_refused(cfg, "compute.num_gpus=1", f"run.ray_address={session_ray}")
    assert error.startswith("compute.num_gpus=1, but this Ray cluster has no GPU (1 node: 1 × 2 CPUs)"), error
    assert took < 60 and not out.exists()
