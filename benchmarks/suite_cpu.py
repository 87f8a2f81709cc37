"""Where the test suite's CPU goes: every process's CPU charged to the test its pytest worker was running.

The suite is CPU-bound on 2 cores (the machine ~90% busy throughout), so its wall time follows the CPU its tests
spend, most of it in processes the tests start (job drivers, Ray workers and replicas, private Ray clusters), not in
pytest itself. This runs pytest with the arguments given, with a plugin (this module, `-p benchmarks.suite_cpu`)
that makes each pytest process publish the test it is running, and a sampler that, once a second, charges each
process's CPU since the last sample to the test of its nearest pytest ancestor (a Ray worker's ancestor is the
raylet a test or the session fixture started; processes re-parented to init are "unattributed"). At the end: the
machine's CPU, and CPU seconds and wall seconds by file and by test, largest first. The first test of each pytest
worker carries that worker's session fixtures (its Ray, S3 server, tiny models); a test shorter than the 1 s
sampling may be charged to a neighbour or to "between tests".

    python -m benchmarks.suite_cpu --out /tmp/suite-cpu.json -- -n 2 --dist loadfile --no-loadscope-reorder

(from the repository root with the test venv; the arguments after `--` go to pytest).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

TRACK_DIR_VAR = "EMBEDRANK_SUITE_CPU_DIR"
IDLE = "-"


# -- the plugin, in every pytest process --------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    folder = os.environ.get(TRACK_DIR_VAR)
    if not folder:
        yield
        return
    path = os.path.join(folder, str(os.getpid()))
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(item.nodeid)
    yield
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(IDLE)


# -- the sampler --------------------------------------------------------------------------------------------------


def read_procs() -> dict[int, tuple[int, float, str]]:
    """pid → (parent pid, CPU seconds so far, start time in clock ticks) of every process now."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
            out[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / hz, rest[19])
        except (OSError, IndexError, ValueError):
            continue
    return out


def owner(pid: int, procs: dict[int, tuple[int, float, str]], running: dict[int, str]) -> str | None:
    """The test that the nearest pytest ancestor of `pid` (itself included) runs; None if it has none."""
    for _ in range(64):
        if pid in running:
            return running[pid]
        if pid not in procs or pid <= 1:
            return None
        pid = procs[pid][0]
    return None


def charge(procs: dict[int, tuple[int, float, str]], seen: dict[tuple[int, str], float],
           running: dict[int, str], by_test: collections.Counter, first: bool) -> float:
    """Charge each process's CPU since it was last `seen` to its test (`by_test`); a process seen for the first
    time is charged all its CPU unless this is the first sample (processes older than the run are only noted).
    Returns the CPU nobody owns."""
    lost = 0.0
    for pid, (_, cpu, start) in procs.items():
        key = (pid, start)
        before = seen.get(key, cpu if first else 0.0)
        seen[key] = cpu
        spent = cpu - before
        if spent <= 0:
            continue
        test = owner(pid, procs, running)
        if test is None:
            lost += spent
        else:
            by_test[test] += spent
    return lost


def machine_busy_s() -> float:
    with open("/proc/stat", encoding="ascii") as fh:
        ticks = list(map(int, fh.readline().split()[1:]))
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def sample(folder: str, out: str, stop_file: str) -> None:
    """Once a second until `stop_file` exists: charge CPU to tests; then write the totals to `out` (JSON)."""
    seen: dict[tuple[int, str], float] = {}
    by_test: collections.Counter = collections.Counter()
    lost, first, began = 0.0, True, machine_busy_s()
    while not os.path.exists(stop_file):
        running = {}
        for name in os.listdir(folder):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as fh:
                    running[int(name)] = fh.read()
            except (OSError, ValueError):
                continue
        lost += charge(read_procs(), seen, running, by_test, first)
        first = False
        time.sleep(1)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"machine_cpu_s": machine_busy_s() - began, "unattributed_cpu_s": lost, "by_test": by_test}, fh)


# -- the report -----------------------------------------------------------------------------------------------------


def report(cpu: dict[str, Any], durations: dict[str, float], top: int = 40) -> str:
    by_test = {k: v for k, v in cpu["by_test"].items() if k != IDLE}
    by_file: collections.Counter = collections.Counter()
    wall_by_file: collections.Counter = collections.Counter()
    for test, spent in by_test.items():
        by_file[test.split("::")[0]] += spent
    for test, wall in durations.items():
        wall_by_file[test.split("::")[0]] += wall
    lines = [f"machine CPU {cpu['machine_cpu_s']:.0f} s; charged to tests {sum(by_test.values()):.0f} s; between "
             f"tests {cpu['by_test'].get(IDLE, 0):.0f} s; unattributed {cpu['unattributed_cpu_s']:.0f} s",
             "", "  CPU s   wall s  file"]
    lines += [f"{spent:7.1f}  {wall_by_file.get(f, 0):7.1f}  {f}" for f, spent in by_file.most_common(top)]
    lines += ["", "  CPU s   wall s  test"]
    lines += [f"{spent:7.1f}  {durations.get(t, 0):7.1f}  {t}"
              for t, spent in sorted(by_test.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


def durations_from(log: str) -> dict[str, float]:
    """Test → seconds (setup + call + teardown) from pytest's `--durations=0` lines."""
    out: dict[str, float] = collections.Counter()
    for line in log.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].endswith("s") and parts[1] in ("setup", "call", "teardown"):
            try:
                out[parts[2]] += float(parts[0][:-1])
            except ValueError:
                continue
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="suite-cpu.json", help="where the CPU by test goes (JSON)")
    parser.add_argument("--sample", nargs=3, metavar=("DIR", "OUT", "STOP"), help=argparse.SUPPRESS)
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    if args.sample:
        sample(*args.sample)
        return 0
    folder = tempfile.mkdtemp(prefix="suite-cpu-")
    stop = os.path.join(tempfile.mkdtemp(prefix="suite-cpu-stop-"), "stop")
    env = {**os.environ, TRACK_DIR_VAR: folder}
    sampler = subprocess.Popen([sys.executable, "-m", "benchmarks.suite_cpu", "--sample", folder, args.out, stop])
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "benchmarks.suite_cpu", "--durations=0",
                          *args.pytest_args], env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    open(stop, "w").close()
    sampler.wait(timeout=60)
    print(run.stdout.splitlines()[-1] if run.stdout else run.stderr[-2000:])
    with open(args.out, encoding="utf-8") as fh:
        cpu = json.load(fh)
    print(f"pytest exit {run.returncode}, wall {wall:.0f} s")
    print(report(cpu, durations_from(run.stdout)))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
