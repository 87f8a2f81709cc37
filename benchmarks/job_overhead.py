"""What one small job process costs the machine, by `compute.io_num_cpus`.

    python -m benchmarks.job_overhead [--runs 3] [--items 24] [--values 0.25,0.5] [--results FILE]

A job's read, tokenize and write tasks reserve `compute.io_num_cpus` each, so a node runs up to its free CPUs ÷
that many at once, and Ray starts a worker process for each (a job's workers are its own: seconds of CPU each
for the interpreter, Ray, Ray Data, pyarrow and our modules). This measures what that costs a small job.

One local Ray held by this process (every CPU of the machine), a random Qwen3 (hidden 64, 2 layers) with the
real tokenizer, `--items` items of 10 rows in 4 Parquet files. Each run is `embedrank embed` as a process that
joins that Ray (`run.ray_address`, as a driver joins a cluster) and writes a fresh output; one replica of 0.5
CPU; the values of `--values` alternate run by run. Per run: the machine's CPU seconds (`/proc/stat`: every
process, the driver, Ray's workers and daemons) from launch until 3 s after the process exits, the Ray worker
processes started (worker log files in the session directory), and the process's wall time. Prints medians and
each value's ratio against the first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HZ = os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq) since boot."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:8]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / HZ


def workers_started(session_logs: str) -> int:
    return sum(1 for n in os.listdir(session_logs) if n.startswith("worker-") and n.endswith(".out"))


def corpus(folder: str, items: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    rows = items * 10
    for shard in range(4):
        ids = [f"s{shard}-{i}" for i in range(shard * rows // 4, (shard + 1) * rows // 4)]
        pq.write_table(pa.table({"id": ids, "text": [f"document {d} " + "word " * (i % 13) for i, d in enumerate(ids)]}),
                       os.path.join(folder, f"part-{shard}.parquet"), row_group_size=10)


def one_run(work: str, address: str, logs: str, io_num_cpus: str, n: int) -> dict[str, float]:
    out = os.path.join(work, f"out-{n}")
    argv = [sys.executable, "-m", "pipelines.cli", "embed", os.path.join(work, "job.yaml"), "--json",
            "--set", f"run.ray_address={address}", "--set", f"output.path={out}",
            "--set", f"compute.io_num_cpus={io_num_cpus}"]
    env = {**os.environ, "PYTHONPATH": REPO, "EMBEDRANK_MODEL_CACHE": os.path.join(work, "cache")}
    cpu0, workers0, t0 = machine_cpu_s(), workers_started(logs), time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"the job failed (io_num_cpus={io_num_cpus}):\n{done.stderr[-3000:]}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])["totals"]["rows"]
    time.sleep(3)  # the job's workers exit after its driver
    return {"cpu_s": machine_cpu_s() - cpu0, "workers": workers_started(logs) - workers0, "wall_s": wall,
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs per value")
    p.add_argument("--items", type=int, default=24)
    p.add_argument("--values", default="0.25,0.5", help="compute.io_num_cpus values, comma-separated")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    values = args.values.split(",")

    import ray

    from actors.random_qwen import build_random_qwen3

    work = tempfile.mkdtemp(prefix="job-overhead-")
    model = str(build_random_qwen3(os.path.join(work, "model"), kind="embedding"))
    corpus(os.path.join(work, "corpus"), args.items)
    with open(os.path.join(work, "job.yaml"), "w") as fh:
        fh.write(f'input: {{paths: ["{work}/corpus/*.parquet"], rows_per_item: 10}}\n'
                 f'model: {{path: "{model}", max_length: 32}}\n'
                 f'output: {{path: "{work}/out"}}\n'
                 "compute: {batch_rows: 10, min_replicas: 1, max_replicas: 1, num_cpus: 0.5}\n")
    temp = tempfile.mkdtemp(prefix="jo-ray-")
    ray.init(address="local", include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    logs = os.path.join(temp, "session_latest", "logs")
    load = os.getloadavg()
    one_run(work, address, logs, values[0], -1)  # warm-up: the tokenizer spec cache, the page cache
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in values}
    for r in range(args.runs):
        for v in values if r % 2 == 0 else values[::-1]:
            runs[v].append(one_run(work, address, logs, v, len(runs[v]) + 100 * values.index(v)))
    ray.shutdown()

    lines = [f"job overhead by compute.io_num_cpus, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: one "
             f"`embedrank embed` process joining a running local Ray ({os.cpu_count()} cores), {args.items} items of "
             f"10 rows, random Qwen3 64 x 2 layers, one 0.5-CPU replica; {args.runs} runs per value, alternating "
             f"(load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f})", ""]
    base = None
    for v in values:
        med = {k: statistics.median(r[k] for r in runs[v]) for k in ("cpu_s", "workers", "wall_s")}
        base = base or med
        each = {k: ", ".join(format(r[k], ".1f") for r in runs[v]) for k in ("cpu_s", "wall_s")}
        lines.append(f"  io_num_cpus {v:>5}: machine CPU {med['cpu_s']:5.1f} s (runs: {each['cpu_s']}), Ray "
                     f"workers started {med['workers']:.0f}, wall {med['wall_s']:5.1f} s (runs: {each['wall_s']}); "
                     f"÷ first: CPU {med['cpu_s'] / base['cpu_s']:.2f}, wall {med['wall_s'] / base['wall_s']:.2f}")
        assert all(r["rows"] == args.items * 10 for r in runs[v])
    lines += ["", f"command: python -m benchmarks.job_overhead --runs {args.runs} --items {args.items} "
                  f"--values {args.values}"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.results:
        with open(args.results, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
