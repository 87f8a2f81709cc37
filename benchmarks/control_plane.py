"""Control-plane benchmark by simulation: what the driver pays to resume, report and verify as a job grows.

    python -m benchmarks.control_plane [--sizes 10000,100000,1000000] [--big-items 20000] [--big-files 20000]
                                       [--results FILE]

On a throwaway local S3 server (SeaweedFS, as the tests start it: `tests/support/s3_server.py`) it synthesises,
with the real record classes, the output of finished embed jobs:

* at 10⁴, 10⁵ and 10⁶ rows: real Parquet inputs (50,000-row files, so one work item a file at the default
  `input.rows_per_item`), a plan written by the real `OutputRoot.prepare` (header + shards, footers really read),
  one small data file per item (`id` + a 32-float vector, as many rows as the item) and its `ItemCommit`;
* at 10⁹ rows, the control files only: `--big-items` items of 50,000 rows over `--big-files` input objects
  (1-row Parquet files: only their listing is ever used) and one commit record per item naming a data file
  that is not there.

Each size is then measured in fresh subprocesses through the real CLI, side by side: `embedrank embed` resuming
the finished job (start-up = process start to its `resume: N item(s) already committed, 0 to process` line:
imports, config, plan reuse from the stored plan, lock, `prepare` with its commit reads and orphan scan; then
close: orphan scan, `_SUCCESS`, report), `embedrank status`, `embedrank verify --quick` and full `embedrank
verify`, with `--engine local` (the driver does every check) and `--engine ray` (a Ray Data job; the process
starts its own local Ray; where data exists). Peak RSS is the child's own high-water mark (`VmHWM` at its exit,
see `_HWM`). It also times `OutputRoot.read_commits` of the big case at 16 and 64 threads, and the cold plan of
the big input (every footer read) against the reused one. Then it prints the table, the goals' ratios (driver RSS
of the big job's 20,000 items against the smallest job's one item, for the commands that run on it; the full
verify engines at the largest job with data), a 10⁹-row projection from the measured growth per item, and
writes them to `--results`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_ITEM = 50_000
DIM = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HWM = """
import atexit, os, runpy, sys
def _hwm():
    with open("/proc/self/status") as fh:
        peak = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_HWM_FILE"], "w") as fh:
        fh.write(peak)
atexit.register(_hwm)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0].endswith(".py") else \
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
"""Runs a module (or script) and records its peak RSS (VmHWM, kB) at exit. `ru_maxrss` from `wait4` would not
do: Linux carries the forking parent's high-water mark over `exec` into the child's."""
EMBEDRANK = [sys.executable, "-c", _HWM, "pipelines.cli"]
SNAPSHOT_FILE = "_commits_snapshot.parquet"


@dataclasses.dataclass
class Run:
    """One measured subprocess: wall seconds, seconds to a marker line, peak RSS (MiB), exit status, output."""

    wall_s: float
    marker_s: float | None
    rss_mib: float
    rc: int
    out: str


def measure(cmd: list[str], env: dict[str, str], marker: str | None = None) -> Run:
    """Run `cmd` (a `_HWM` command line) to its end: wall time, time to the first line holding `marker`, and the
    process's own peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".hwm") as hwm:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True,
                                env={**env, "BENCH_HWM_FILE": hwm.name})
        seen, lines = None, []
        for line in proc.stdout:
            lines.append(line)
            if marker and seen is None and marker in line:
                seen = time.monotonic() - start
        proc.wait()
        with open(hwm.name) as fh:
            peak_kb = int(fh.read() or 0)
    return Run(round(time.monotonic() - start, 2), round(seen, 2) if seen is not None else None,
               round(peak_kb / 1024, 1), proc.returncode, "".join(lines))


def _parquet_bytes(table: pa.Table, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


class Bench:
    def __init__(self, server, workdir: str, model: str):
        self.server = server
        self.fs = server.filesystem()
        self.options = server.storage_options()
        self.workdir = workdir
        self.model = model
        self.bucket = server.make_bucket("bench")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
        self.env["PYTHONPATH"] = REPO

    def cli_options(self) -> list[str]:
        o = self.options
        return ["--storage-option", f"endpoint_url={o['endpoint_url']}", "--storage-option", f"key={o['key']}",
                "--storage-option", f"secret={o['secret']}",
                "--storage-option", f"client_kwargs={{region_name: {o['client_kwargs']['region_name']}}}"]

    def config(self, name: str) -> tuple[Any, str]:
        """The job config of size `name` (an EmbedJobConfig) and its YAML file."""
        import yaml

        from pipelines.embed.config import EmbedJobConfig

        data = {"input": {"paths": [f"s3://{self.bucket}/{name}/in/*.parquet"], "id_column": "doc_id",
                          "storage_options": self.options},
                "model": {"path": self.model},
                "output": {"path": f"s3://{self.bucket}/{name}/out"}}
        path = os.path.join(self.workdir, f"{name}.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(data, fh)
        return EmbedJobConfig.model_validate(data), path

    def put_many(self, blobs: dict[str, bytes], threads: int = 32) -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda kv: self.fs.pipe_file(kv[0], kv[1]), blobs.items()))

    def synthesise_with_data(self, rows: int) -> dict[str, Any]:
        """Inputs, plan, data files and commits of a finished job of `rows` rows; returns its sizes."""
        from pipelines.embed.job import embed_fingerprint
        from pipelines.fingerprint import fingerprint_id
        from pipelines.input.plan import make_plan, planning_key
        from pipelines.lifecycle import recorded_config
        from pipelines.output.records import FileRef, ItemCommit, Totals
        from pipelines.output.root import OutputRoot
        from pipelines.storage import Storage

        name = f"n{rows}"
        files = -(-rows // ROWS_PER_ITEM)
        inputs = {}
        for f in range(files):
            n = min(ROWS_PER_ITEM, rows - f * ROWS_PER_ITEM)
            ids = [f"d{f:05d}-{i:06d}" for i in range(n)]
            inputs[f"{self.bucket}/{name}/in/part-{f:05d}.parquet"] = _parquet_bytes(
                pa.table({"doc_id": ids, "text": [f"text of document {i}" for i in ids]}), row_group_size=10_000)
        self.put_many(inputs)
        cfg, _ = self.config(name)
        fingerprint = embed_fingerprint(cfg)
        fp_id = fingerprint_id(fingerprint)
        plan = make_plan(cfg.input)
        root = OutputRoot(Storage(cfg.output.path, self.options))
        root.prepare(fingerprint, fp_id, plan.items, recorded_config(cfg), plan_key=planning_key(cfg.input))
        rng = np.random.default_rng(0)
        commits = []
        for k, item in enumerate(plan.items):
            n = item.row_end - item.row_start
            ids = [f"d{k:05d}-{i:06d}" for i in range(item.row_start, item.row_end)]
            vectors = rng.standard_normal((n, DIM), dtype=np.float32)
            table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(vectors.ravel(), DIM),
                              "n_tokens": pa.array(np.full(n, 6, np.int32)),
                              "truncated": pa.array(np.zeros(n, bool))})
            data = _parquet_bytes(table)
            digest = hashlib.sha256(data).hexdigest()
            path = f"data/{item.item_id}-{item.row_start}-{item.row_end}-{digest[:16]}.parquet"
            root.storage.write_bytes(path, data)
            ref = FileRef(path, n, digest, len(data), item.row_start, item.row_end)
            commits.append(root.write_commit(ItemCommit(
                item=item.item_id, fingerprint_id=fp_id, source=item.rel, row_start=item.row_start,
                row_end=item.row_end, files=(ref,), rows=n, tokens=6 * n, committed_at=_now())))
        root.write_success(Totals.of(commits))
        return {"rows": rows, "items": len(plan.items), "input_files": files}

    def synthesise_control_only(self, items: int, files: int) -> dict[str, Any]:
        """The control files of a finished job of `items` items of `ROWS_PER_ITEM` rows over `files` inputs."""
        from pipelines.embed.job import embed_fingerprint
        from pipelines.fingerprint import fingerprint_id
        from pipelines.input.plan import WorkItem, _item_id, planning_key
        from pipelines.lifecycle import recorded_config
        from pipelines.output.records import FileRef, ItemCommit, Totals
        from pipelines.output.root import OutputRoot
        from pipelines.storage import Storage, expand_inputs

        name = "n1e9"
        tiny = _parquet_bytes(pa.table({"doc_id": ["x"], "text": ["x"]}))
        self.put_many({f"{self.bucket}/{name}/in/part-{f:05d}.parquet": tiny for f in range(files)}, threads=64)
        cfg, _ = self.config(name)
        listed = expand_inputs(cfg.input.paths, ".parquet", self.options)
        per_file = -(-items // files)
        planned = []
        for f in listed:
            for k in range(per_file):
                if len(planned) == items:
                    break
                start, end = k * ROWS_PER_ITEM, (k + 1) * ROWS_PER_ITEM
                planned.append(WorkItem(_item_id(f, start, end), f.url, f.rel, "parquet", start, end, (k, k + 1),
                                        ROWS_PER_ITEM * 64, size=f.size, version=f.version))
        fingerprint = embed_fingerprint(cfg)
        fp_id = fingerprint_id(fingerprint)
        root = OutputRoot(Storage(cfg.output.path, self.options))
        root.prepare(fingerprint, fp_id, planned, recorded_config(cfg), plan_key=planning_key(cfg.input))
        data_bytes = ROWS_PER_ITEM * (DIM * 4 + 40)

        def commit(item: WorkItem) -> ItemCommit:
            digest = hashlib.sha256(item.item_id.encode()).hexdigest()
            ref = FileRef(f"data/{item.item_id}-{item.row_start}-{item.row_end}-{digest[:16]}.parquet",
                          ROWS_PER_ITEM, digest, data_bytes, item.row_start, item.row_end)
            return root.write_commit(ItemCommit(
                item=item.item_id, fingerprint_id=fp_id, source=item.rel, row_start=item.row_start,
                row_end=item.row_end, files=(ref,), rows=ROWS_PER_ITEM, tokens=6 * ROWS_PER_ITEM,
                committed_at=_now()))

        with ThreadPoolExecutor(64) as pool:
            commits = list(pool.map(commit, planned))
        root.write_success(Totals.of(commits))
        return {"rows": items * ROWS_PER_ITEM, "items": items, "input_files": files}

    def sizes(self, name: str) -> dict[str, int]:
        """Bytes and counts of the control files and data files of output `name`."""
        out = f"{self.bucket}/{name}/out"
        found = self.fs.find(out, detail=True)
        sizes = {"control_bytes": 0, "commit_files": 0, "plan_bytes": 0, "job_json_bytes": 0, "data_files": 0,
                 "data_bytes": 0}
        for path, info in found.items():
            rel = path[len(out) + 1:]
            size = int(info.get("size") or 0)
            if rel.startswith("data/"):
                sizes["data_files"] += 1
                sizes["data_bytes"] += size
            elif rel.startswith(("_commits/", "_plan/", "_job.json", "_SUCCESS")):
                sizes["control_bytes"] += size
                sizes["commit_files"] += rel.startswith("_commits/")
                sizes["plan_bytes"] += size if rel.startswith("_plan/") else 0
                sizes["job_json_bytes"] += size if rel == "_job.json" else 0
        return sizes

    def measure_size(self, name: str, with_data: bool) -> dict[str, Any]:
        _, config = self.config(name)
        url = f"s3://{self.bucket}/{name}/out"
        self.crash_snapshot(name)
        crash = self.resume(config, name)  # the snapshot as a crashed writer may leave it: SNAPSHOT_EVERY-1 behind
        resume = self.resume(config, name)  # as the finished run before it left it
        status = measure([*EMBEDRANK, "status", url, "--json", *self.cli_options()], self.env)
        quick = measure([*EMBEDRANK, "verify", url, "--quick", *self.cli_options()], self.env)
        full = measure([*EMBEDRANK, "verify", url, "--engine", "local", *self.cli_options()], self.env) \
            if with_data else None
        on_ray = measure([*EMBEDRANK, "verify", url, "--engine", "ray", *self.cli_options()], self.env) \
            if with_data else None
        for label, run, must_pass in (("status", status, True), ("verify --quick", quick, with_data),
                                      ("verify", full, True), ("verify --engine ray", on_ray, True)):
            if run is not None and must_pass and run.rc != 0:
                raise SystemExit(f"{label} of {name} failed:\n{run.out[-3000:]}")
        self.fs.rm(f"{self.bucket}/{name}/out/{SNAPSHOT_FILE}")
        cold = self.resume(config, name)  # no snapshot at all (an output of an older embedrank): a GET a record
        line = next(x for x in resume.out.splitlines() if x.startswith("resume:"))
        return {"crash": crash, "cold": cold, "resume": resume, "status": status, "quick": quick, "full": full,
                "ray": on_ray, "resume_line": line}

    def resume(self, config: str, name: str) -> Run:
        run = measure([*EMBEDRANK, "embed", config, "--json"], self.env, marker="resume:")
        if run.rc != 0 or "0 to process" not in run.out:
            raise SystemExit(f"resume of {name} did not find every item committed:\n{run.out[-3000:]}")
        return run

    def crash_snapshot(self, name: str) -> None:
        """Leave the commit snapshot as the worst crash would: the last `SNAPSHOT_EVERY - 1` records not in it."""
        from pipelines.output.commit_snapshot import write_snapshot
        from pipelines.output.root import COMMITS_DIR, SNAPSHOT_EVERY, OutputRoot
        from pipelines.storage import Storage

        root = OutputRoot(Storage(f"s3://{self.bucket}/{name}/out", self.options))
        records = root.read_commits()
        keep = dict(list(records.items())[:max(0, len(records) - (SNAPSHOT_EVERY - 1))])
        write_snapshot(root.storage, COMMITS_DIR, keep)


def _now() -> str:
    from pipelines.output.records import now

    return now()


def _script(bench: Bench, name: str, code: str) -> list[str]:
    path = os.path.join(bench.workdir, f"{name}.py")
    with open(path, "w") as fh:
        fh.write(code)
    return [sys.executable, "-c", _HWM, path]


SAMPLE = 4000
"""Records read, and input files planned cold, by the side measurements (the whole 20,000 would add ~5 minutes)."""

READS = """
import json, sys, time
from pipelines.output.root import OutputRoot
from pipelines.storage import Storage
root = OutputRoot(Storage(sys.argv[1], json.loads(sys.argv[2])))
ids = root.commit_ids()[:int(sys.argv[4])]
t = time.monotonic()
n = len(root._get_commits(ids, int(sys.argv[3])))
print(n, time.monotonic() - t)
"""

PLAN = """
import sys, time, yaml
from pipelines.embed.config import EmbedJobConfig
from pipelines.input.plan import make_plan
from pipelines.output.root import OutputRoot
from pipelines.storage import Storage
cfg = EmbedJobConfig.model_validate(yaml.safe_load(open(sys.argv[1])))
cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"paths": [sys.argv[3]]})})
root = OutputRoot(Storage(cfg.output.path, cfg.input.storage_options))
t = time.monotonic()
plan = make_plan(cfg.input, previous=root.previous_plan() if sys.argv[2] == "reuse" else None)
print(len(plan.files), plan.footers_read, time.monotonic() - t)
"""


def commit_read_threads(bench: Bench, name: str) -> dict[int, float]:
    """Seconds GETting `SAMPLE` commit records of output `name` one by one at 16 and 64 threads (a fresh
    process each)."""
    out = {}
    for threads in (16, 64):
        run = measure([*_script(bench, "reads", READS), f"s3://{bench.bucket}/{name}/out",
                       json.dumps(bench.options), str(threads), str(SAMPLE)], bench.env)
        out[threads] = round(float(run.out.strip().splitlines()[-1].split()[1]), 2)
    return out


def plan_times(bench: Bench, name: str) -> dict[str, float]:
    """Seconds planning the first `SAMPLE` input files of the big job cold (every footer read) and reusing the
    stored plan, in fresh processes."""
    _, config = bench.config(name)
    subset = f"s3://{bench.bucket}/{name}/in/part-0[0-{SAMPLE // 1000 - 1}]???.parquet"
    out = {}
    for mode in ("cold", "reuse"):
        run = measure([*_script(bench, "plan", PLAN), config, mode, subset], bench.env)
        files, footers, seconds = run.out.strip().splitlines()[-1].split()
        out[mode] = round(float(seconds), 2)
        out[f"{mode}_footers"] = int(footers)
        out["files"] = int(files)
    return out


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares `y = a + b·x` (through one point: `b` = 0)."""
    if len(set(xs)) < 2:
        return float(np.mean(ys)), 0.0
    b, a = np.polyfit(np.array(xs, float), np.array(ys, float), 1)
    return float(a), float(b)


def report(rows: list[dict[str, Any]], threads: dict[int, float], plans: dict[str, float], load: str) -> str:
    head = (f"{'rows':>13} {'items':>6} {'in files':>8} {'data files':>10} {'control B':>11} {'_job.json B':>11} "
            f"{'no-snap s':>9} {'crash s':>7} {'crash MiB':>9} {'start s':>7} {'resume s':>8} {'resume MiB':>10} "
            f"{'status s':>8} {'status MiB':>10} {'quick s':>7} {'quick MiB':>9} {'verify s':>8} {'verify MiB':>10} "
            f"{'ray ver. s':>10} {'ray ver. MiB':>12}")
    lines = [head]
    for r in rows:
        m, s = r["measured"], r["sizes"]
        full, on_ray = m["full"], m["ray"]
        lines.append(
            f"{r['rows']:>13,} {r['items']:>6,} {r['input_files']:>8,} {s['data_files']:>10,} "
            f"{s['control_bytes']:>11,} {s['job_json_bytes']:>11,} {m['cold'].marker_s:>9.2f} "
            f"{m['crash'].marker_s:>7.2f} {m['crash'].rss_mib:>9.1f} {m['resume'].marker_s:>7.2f} "
            f"{m['resume'].wall_s:>8.2f} {m['resume'].rss_mib:>10.1f} {m['status'].wall_s:>8.2f} "
            f"{m['status'].rss_mib:>10.1f} {m['quick'].wall_s:>7.2f} {m['quick'].rss_mib:>9.1f} "
            + (f"{full.wall_s:>8.2f} {full.rss_mib:>10.1f}" if full else f"{'-':>8} {'-':>10}")
            + (f" {on_ray.wall_s:>10.2f} {on_ray.rss_mib:>12.1f}" if on_ray else f" {'-':>10} {'-':>12}"))
    small = [r for r in rows if r["measured"]["full"] is not None]
    big = rows[-1]
    lines.append("")
    lines.append("start s: process start to the `resume: N item(s) already committed, 0 to process` line of "
                 "`embedrank embed` on the finished output, as a finished run left it (with its commit snapshot); "
                 "crash: the same with the snapshot as a crashed run may leave it (its last 999 records not in it, "
                 "GET one by one); no-snap: no snapshot at all (every record one GET, as for an output written "
                 "before snapshots); resume s: the whole command (start-up + close: orphan scan, snapshot, "
                 "_SUCCESS, report). MiB: that process's peak RSS (VmHWM).")
    lines.append(f"load while measuring: {load}")
    lines.append("")
    lines.append("goals:")
    base = rows[0]
    largest = small[-1] if small else None

    def rss_goal(label: str, at: dict[str, Any], key: str, note: str = "") -> None:
        a, b = base["measured"][key], at["measured"][key]
        ratio = b.rss_mib / a.rss_mib
        lines.append(f"  driver RSS of {label} at {at['items']:,} items ({at['rows']:,} rows) / at "
                     f"{base['items']:,} item(s) ({base['rows']:,} rows): {b.rss_mib:.1f} / {a.rss_mib:.1f} MiB = "
                     f"{ratio:.2f}x (goal <= 1.2x: {'met' if ratio <= 1.2 else 'MISSED'}){note}")

    # the goal's scale is the big job's item count: what the driver holds grows with items (commit records, plan
    # rows, named files), not with rows, so 20 items against 1 says nothing about 20,000
    for key, label in (("resume", "resume"), ("status", "status"), ("quick", "verify --quick")):
        rss_goal(label, big, key)
    if largest is not None and largest is not base:
        for key, label in (("full", "verify (full, --engine local)"), ("ray", "verify (full, --engine ray)")):
            rss_goal(label, largest, key, f"; not measured at {big['items']:,} items: that job has no data files")
    for key, label in (("resume", "after a finished run"), ("crash", "after a crash"),
                       ("cold", "with no commit snapshot")):
        start = big["measured"][key].marker_s
        lines.append(f"  resume start-up of the {big['rows']:,}-row control plane {label}: {start:.1f} s "
                     f"(goal <= 60 s: {'met' if start <= 60 else 'MISSED'})")
    per_item = max(r["sizes"]["data_files"] / r["items"] for r in small) if small else None
    if per_item is not None:
        lines.append(f"  committed data files per work item (synthesised as the writer commits them, one per item): "
                     f"{per_item:.2f} (goal <= 1)")
    lines.append(f"  {SAMPLE:,} commit records GET one by one: {threads[16]:.1f} s at 16 threads, "
                 f"{threads[64]:.1f} s at 64 (root.COMMIT_READERS = 64); "
                 f"x{big['items'] / SAMPLE:g} for all {big['items']:,}: {threads[16] * big['items'] / SAMPLE:.0f} s "
                 f"/ {threads[64] * big['items'] / SAMPLE:.0f} s")
    lines.append(f"  planning {plans['files']:,} of the big job's input files: cold (every footer read, "
                 f"FOOTER_THREADS = 32) {plans['cold']:.1f} s ({plans['cold_footers']:,} footers); reusing the "
                 f"stored plan {plans['reuse']:.1f} s ({plans['reuse_footers']} footers); "
                 f"x{big['input_files'] / plans['files']:g} for all {big['input_files']:,} files cold: "
                 f"{plans['cold'] * big['input_files'] / plans['files']:.0f} s")
    # the projection: a line through every measured size, items as x (rows = 50,000 x items at the default cut)
    xs = [r["items"] for r in rows]
    target_items = 10**9 // ROWS_PER_ITEM
    lines.append("")
    lines.append(f"projection to 10^9 rows ({target_items:,} items of {ROWS_PER_ITEM:,} rows, one data file each), "
                 "a least-squares line a + b*items through the measured sizes:")
    for label, ys in (
            ("control-file bytes", [r["sizes"]["control_bytes"] for r in rows]),
            ("resume start-up s", [r["measured"]["resume"].marker_s for r in rows]),
            ("resume start-up after a crash s", [r["measured"]["crash"].marker_s for r in rows]),
            ("resume with no snapshot s", [r["measured"]["cold"].marker_s for r in rows]),
            ("resume driver RSS MiB", [r["measured"]["resume"].rss_mib for r in rows]),
            ("status s", [r["measured"]["status"].wall_s for r in rows]),
            ("status driver RSS MiB", [r["measured"]["status"].rss_mib for r in rows]),
            ("verify --quick s", [r["measured"]["quick"].wall_s for r in rows]),
            ("verify --quick driver RSS MiB", [r["measured"]["quick"].rss_mib for r in rows])):
        a, b = _fit(xs, ys)
        lines.append(f"  {label:<32} {a + b * target_items:>14,.1f}   (a={a:,.2f}, b={b:,.5f} per item; measured at "
                     f"{big['items']:,} items: {ys[-1]:,.1f})")
    if small:
        a, b = _fit([r["rows"] for r in small], [r["sizes"]["data_bytes"] for r in small])
        lines.append(f"  {'data bytes (32-float vectors)':<32} {a + b * 10**9:>14,.0f}   ({b:,.1f} bytes a row)")
        a, b = _fit([r["rows"] for r in small], [r["measured"]["full"].rss_mib for r in small])
        lines.append(f"  {'full verify (local) RSS MiB':<32} {a + b * 10**9:>14,.0f}   ({b * 1e6:,.1f} MiB per 10^6 "
                     "rows: the local engine's exact key count; --engine ray keeps it off the driver)")
        a, b = _fit([r["rows"] for r in small], [r["measured"]["full"].wall_s for r in small])
        lines.append(f"  {'full verify (local) s':<32} {a + b * 10**9:>14,.0f}")
    lines.append(f"  {'data files':<32} {target_items:>14,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="row counts synthesised with data")
    parser.add_argument("--big-items", type=int, default=20_000, help="items of the control-only (10^9-row) job")
    parser.add_argument("--big-files", type=int, default=20_000, help="input files of the control-only job")
    parser.add_argument("--results", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from support.s3_server import S3Server

    from actors.random_qwen import build_random_qwen3

    load_before = os.getloadavg()
    workdir = tempfile.mkdtemp(prefix="embedrank-control-plane-")
    model = str(build_random_qwen3(os.path.join(workdir, "model"), kind="embedding"))
    rows_out = []
    with S3Server() as server:
        bench = Bench(server, workdir, model)
        jobs = [(int(float(s)), True) for s in args.sizes.split(",")] + [(args.big_items * ROWS_PER_ITEM, False)]
        for rows, with_data in jobs:
            t = time.monotonic()
            made = bench.synthesise_with_data(rows) if with_data else \
                bench.synthesise_control_only(args.big_items, args.big_files)
            name = f"n{rows}" if with_data else "n1e9"
            print(f"synthesised {rows:,} rows ({made['items']:,} items) in {time.monotonic() - t:.0f} s",
                  file=sys.stderr, flush=True)
            measured = bench.measure_size(name, with_data)
            print(f"  {measured['resume_line']} · start-up {measured['resume'].marker_s} s, "
                  f"{measured['resume'].rss_mib} MiB", file=sys.stderr, flush=True)
            rows_out.append({**made, "sizes": bench.sizes(name), "measured": measured})
        threads = commit_read_threads(bench, "n1e9")
        plans = plan_times(bench, "n1e9")
    load = f"loadavg {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (2 cores, shared)"
    text = report(rows_out, threads, plans, load)
    print(text)
    if args.results:
        with open(args.results, "w") as fh:
            fh.write(f"# python -m benchmarks.control_plane {' '.join(argv or sys.argv[1:])}\n"
                     f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n{text}\n")


if __name__ == "__main__":
    main()
