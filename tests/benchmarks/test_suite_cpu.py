"""`benchmarks.suite_cpu`: each process's CPU is charged to the test its nearest pytest ancestor runs, once."""

from __future__ import annotations

import collections

from benchmarks.suite_cpu import charge, durations_from, owner

# pid → (parent, CPU s so far, start ticks): pytest worker 10 runs a test; its job process 11 and the raylet 12 it
# started, whose Ray worker 13 is its grandchild; 20 belongs to no pytest process
PROCS = {1: (0, 0.0, "1"), 10: (1, 2.0, "100"), 11: (10, 3.0, "101"), 12: (10, 1.0, "102"),
         13: (12, 4.0, "103"), 20: (1, 5.0, "104")}
RUNNING = {10: "tests/a.py::test_one"}


def test_a_ray_worker_is_charged_to_the_test_whose_pytest_process_started_its_raylet():
    assert owner(13, PROCS, RUNNING) == "tests/a.py::test_one"
    assert owner(20, PROCS, RUNNING) is None


def test_cpu_is_charged_once_and_processes_older_than_the_run_only_from_then_on():
    seen: dict = {}
    by_test: collections.Counter = collections.Counter()
    assert charge(PROCS, seen, RUNNING, by_test, first=True) == 0.0 and by_test == {}  # the run starts here
    later = {**PROCS, 13: (12, 6.5, "103"), 20: (1, 7.0, "104"), 14: (12, 1.5, "105")}  # 14: a new Ray worker
    assert charge(later, seen, RUNNING, by_test, first=False) == 2.0  # process 20's CPU belongs to no test
    assert by_test == {"tests/a.py::test_one": 2.5 + 1.5}
    assert charge(later, seen, RUNNING, by_test, first=False) == 0.0 and by_test["tests/a.py::test_one"] == 4.0
    reused = {**later, 14: (12, 0.5, "106")}  # pid 14 reused by a process started later: a new process
    charge(reused, seen, {10: "tests/a.py::test_two"}, by_test, first=False)
    assert by_test["tests/a.py::test_two"] == 0.5


def test_durations_sum_setup_call_and_teardown():
    log = "12.50s call     tests/a.py::test_one\n0.50s setup    tests/a.py::test_one\n(3 durations < 0.005s hidden)"
    assert durations_from(log) == {"tests/a.py::test_one": 13.0}
