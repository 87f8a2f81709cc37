"""`embedrank verify`: the exactly-once invariant of an output, checked against its commit records.

For input ids I, output ids O and rejected ids R: O ∪ R = I, O ∩ R = ∅, no id twice; every file a commit
names exists and matches its recorded row count and checksum; no piece file is left that no commit names. An
embedding output's data files hold exactly its fingerprint's vector columns, typed and sized as configured, float
vectors L2-unit (`vector_schema`; a full check only).

Three ways to check, one Report:
- quick: the control files and the listings only (every planned item committed, each commit's recorded rows
  tile its item, every named file exists with its recorded size); no data file is read.
- full, engine `local`: every named file read in the driver (small outputs: no cluster needed, and fast).
- full, engine `ray`: a Ray Data job (`pipelines.graph.verify_graph`): one task per named file checks its bytes
  and rows (`verify_files.check_file`) and emits a 64-bit hash per row key; keys are grouped on their hash and
  only colliding hashes are compared exactly (`verify_files.duplicate_keys`). Only problems and counters reach
  the driver, so its memory grows with files, never with rows.
Both full engines run the same per-file checks and the same composition, so their Reports are equal. The
Report's `checked` says what ran, as the runner saw it, not what was asked for: `engine`, the `pids` of the
processes that checked files (the driver's own for `local`; the Ray workers' for `ray`, as each task reported it)
and, for `ray`, the hash `buckets` the keys were spread over and how many of them held keys (`key_buckets`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import posixpath
from typing import Any

from common.errors import EmbedrankError
from pipelines.output.pieces import PIECE_DIRS
from pipelines.output.reader import is_rerank, open_committed
from pipelines.output.records import ItemCommit, RankCommit
from pipelines.output.root import OutputRoot
from pipelines.output.vector_schema import expected_vectors, width_problems
from pipelines.output.verify_files import (
    BUCKET_ROW,
    FILE_ROW,
    KEY_BUCKET,
    KEY_KINDS,
    VERIFY_FILE,
    VERIFY_OUT,
    Named,
    check_file,
    check_file_stage,
    count_keys,
    describe_duplicates,
    duplicate_keys,
    group_keys_stage,
)

ENGINES = ("auto", "local", "ray")

AUTO_LOCAL_MAX_ROWS = 1_000_000
"""`engine="auto"` checks an output whose commits name at most this many rows (data, rejects and ranked rows,
as the records count them) in the driver; a larger one as a Ray Data job. The driver-side check holds every row
key in memory (≈100-200 bytes a row: ~0.2 GB at this size) and reads each file in turn, which a cluster does
faster beyond a few million rows."""

KEYS_PER_BUCKET = 4_000_000
"""Row keys one duplicate-finding task of the ray engine holds (≈60-100 bytes each, well under 1 GiB): the keys
are hashed into ⌈rows ÷ this⌉ buckets, each checked whole."""


@dataclasses.dataclass
class Report:
    problems: list[str] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    checked: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What was checked: mode (`quick` or `full`), the engine that ran (and, for a full check, the `pids` that
    checked files; for the ray engine its hash `buckets` and the `key_buckets` that held keys), files, rows and
    bytes the commits name."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        """One line saying what was checked (the CLI prints it)."""
        c = self.checked
        how = ("quick: control files and listed sizes, no data file read" if c.get("mode") == "quick"
               else f"full, engine {c.get('engine')}: checksums, row counts, duplicate keys")
        return (f"checked ({how}): {c.get('files', 0):,} file(s), {c.get('rows', 0):,} row(s), "
                f"{c.get('bytes', 0):,} byte(s) named by {c.get('commits', 0):,} commit(s)")


def named_files(job: dict, commits: dict[str, ItemCommit], ranks: list[RankCommit], rerank: bool) -> list[Named]:
    """Every file the commits name, in commit order (numbered so), with what verify checks in it."""
    found: list[tuple] = []
    for item in job["items"]:
        c = commits.get(item["item_id"])
        if c is None:
            continue
        owner = f"commit {c.item}"
        if c.bad_file:
            if not (c.files or c.rows or len(c.rejects) != 1):
                found.append((c.rejects[0], owner, c.item, "file_reject", c.bad_file.reason))
            continue
        found += [(f, owner, c.item, "scores" if rerank else "rows") for f in c.files]
        found += [(f, owner, c.item, "rerank_rejects" if rerank else "rejected") for f in c.rejects]
    for r in ranks:
        found += [(f, f"rank commit {r.bucket}", None, "ranked") for f in r.files]
        found += [(f, f"rank commit {r.bucket}", None, "rank_rejects") for f in r.rejects]
    return [Named(i, *entry) for i, entry in enumerate(found)]


def _check_commits(job: dict, commits: dict[str, ItemCommit], report: Report, counts: collections.Counter) -> None:
    """Control checks of the item commits: every planned item committed with the job's fingerprint, covering
    the rows the plan gives it, and its records' file row counts tiling those rows."""
    for item in job["items"]:
        commit = commits.get(item["item_id"])
        if commit is None:
            report.problems.append(f"item {item['item_id']} ({item['rel']}) is not committed")
            continue
        counts["committed_items"] += 1
        if commit.fingerprint_id != job["fingerprint_id"]:
            report.problems.append(f"commit {item['item_id']} has another fingerprint")
        if commit.bad_file:
            counts["rejected_files"] += 1
            if commit.files or commit.rows or len(commit.rejects) != 1:
                report.problems.append(f"commit {commit.item} rejects its file whole but names rows or no single "
                                       "marker")
            continue
        expected = commit.row_end - commit.row_start
        if item["row_end"] is not None and expected != item["row_end"] - item["row_start"]:
            report.problems.append(f"commit {item['item_id']} covers {expected} rows, the plan says otherwise")
        recorded = sum(f.rows for f in commit.files + commit.rejects)
        if recorded != expected:
            report.problems.append(f"commit {item['item_id']}: its records name {recorded} rows, the item has "
                                   f"{expected}")


def _check_rank_commits(ranks: list[RankCommit], top_k: int | None, scored_rows: int, report: Report,
                        counts: collections.Counter) -> None:
    """Control checks of the rank commits against the scored pairs (`scored_rows`)."""
    counts["ranked_rows"] = sum(c.rows for c in ranks)
    counts["duplicate_pairs"] = sum(c.rejected for c in ranks)
    if sum(c.scored for c in ranks) != scored_rows:
        report.problems.append(f"rank commits cover {sum(c.scored for c in ranks)} scored pairs of {scored_rows}")
    if top_k is None and counts["ranked_rows"] + counts["duplicate_pairs"] != scored_rows:
        report.problems.append("ranked rows + duplicate pairs differ from scored pairs")


def _listing_top(path: str) -> str:
    """The folder to list for `path`: its first piece folder (`data`, `../v000001/_rejects`), so that one
    recursive listing covers every partition folder under it."""
    parts = posixpath.normpath(path).split("/")
    for i, part in enumerate(parts[:-1]):
        if part in PIECE_DIRS:
            return "/".join(parts[:i + 1])
    return posixpath.dirname(posixpath.normpath(path))


def _check_sizes(root: OutputRoot, files: list[Named], report: Report) -> None:
    """Every named file listed, with its recorded byte size (where the record has one); no file is read."""
    listed: dict[str, int | None] = {}
    for top in sorted({_listing_top(n.ref.path) for n in files}):
        listed.update(root.storage.list_file_sizes(top))
    for n in files:
        path = posixpath.normpath(n.ref.path)
        if path not in listed:
            report.problems.append(f"{n.ref.path} named by {n.owner} is missing")
        elif n.ref.bytes is not None and listed[path] is not None and listed[path] != n.ref.bytes:
            report.problems.append(f"{n.ref.path}: {listed[path]} bytes, {n.owner} says {n.ref.bytes}")


def _run_local(root: OutputRoot, files: list[Named], top_k: int | None, buckets: int | None,
               vectors: list | None) -> tuple[list[dict], dict, dict]:
    """Each file checked in the driver; duplicates counted exactly over every key (`buckets` does not apply)."""
    results, keys = [], collections.Counter()
    for n in files:
        result, found = check_file(root.storage, n, top_k, vectors)
        results.append(result)
        for kind, values in found.items():
            keys.update((kind, k) for k in values.to_pylist())
    return results, count_keys(keys), {"engine": "local", "pids": [os.getpid()]}


def _run_ray(root: OutputRoot, files: list[Named], top_k: int | None, buckets: int | None,
             vectors: list | None) -> tuple[list[dict], dict, dict]:
    """Each file checked in a Ray task; keys grouped on their hash into `buckets` (default ⌈rows ÷
    `KEYS_PER_BUCKET`⌉); only file results, per-bucket summaries and duplicate counts come back to the driver."""
    from pipelines import graph
    from pipelines.config import RunConfig
    from pipelines.ray_runtime import stream_rows

    buckets = buckets or max(1, -(-sum(n.ref.rows for n in files) // KEYS_PER_BUCKET))
    ran: dict[str, Any] = {"engine": "ray", "pids": [], "buckets": buckets, "key_buckets": 0}
    if not files:
        return [], {}, ran
    named = [json.dumps(n.to_json()) for n in files]

    def build():
        return graph.verify_graph(VERIFY_FILE, named, check_file_stage.stage, KEY_BUCKET, group_keys_stage.stage,
                                  num_partitions=min(buckets + 1, 256), num_cpus=0.5, storage=root.storage,
                                  top_k=top_k, buckets=buckets, vectors=vectors)

    results, dups, checked_buckets = [], [], set()
    for row in stream_rows(build, RunConfig()):
        out = json.loads(row[VERIFY_OUT])
        if FILE_ROW in out:
            results.append(out[FILE_ROW])
        elif BUCKET_ROW in out:
            checked_buckets.add(out[BUCKET_ROW])
        else:
            dups.append(out)
    results.sort(key=lambda r: r["i"])
    ran.update(pids=sorted({r.pop("pid") for r in results}), key_buckets=len(checked_buckets))
    return results, duplicate_keys(dups), ran


def _compose(job: dict, commits: dict[str, ItemCommit], files: list[Named], results: list[dict], dups: dict,
             rerank: bool, report: Report, counts: collections.Counter) -> None:
    """The problems and counts of a full check, from the per-file results and the duplicate counts."""
    by_item: collections.Counter = collections.Counter()
    keys: collections.Counter = collections.Counter()
    for n, result in zip(files, results):
        report.problems += result["problems"]
        keys.update(result["keys"])
        if result["rows"] is None or n.role in ("file_reject", "ranked", "rank_rejects"):
            continue
        by_item[n.item] += result["rows"]
        counts["rejected" if n.role in ("rejected", "rerank_rejects") else "rows"] += result["rows"]
    for item in job["items"]:
        c = commits.get(item["item_id"])
        if c is not None and not c.bad_file and by_item[c.item] != c.row_end - c.row_start:
            report.problems.append(f"commit {c.item}: files hold {by_item[c.item]} rows, the item has "
                                   f"{c.row_end - c.row_start}")
    report.problems += width_problems([(n.ref.path, r["widths"]) for n, r in zip(files, results)])
    for kind in KEY_KINDS:
        if dups.get(kind):
            report.problems.append(describe_duplicates(kind, dups[kind]))
    extra = {kind: dups[kind]["extra"] if dups.get(kind) else 0 for kind in KEY_KINDS}
    if rerank:
        counts["unique_rows"] = keys["row"] - extra["row"]
        counts["queries"] = keys["query"] - extra["query"]
    else:
        counts["unique_ids"] = keys["id"] - extra["id"]


def verify_output(output: str, storage_options: dict[str, Any] | None = None, *, quick: bool = False,
                  engine: str = "auto", buckets: int | None = None) -> Report:
    """Check every planned item is committed once, every named file matches, every row appears once.

    `quick`: control files and listed sizes only (no data file read). `engine`: `local` (in the driver),
    `ray` (a Ray Data job), `auto` (local up to `AUTO_LOCAL_MAX_ROWS` named rows). `buckets`: the hash buckets
    the ray engine groups row keys into (default ⌈rows ÷ `KEYS_PER_BUCKET`⌉)."""
    if engine not in ENGINES:
        raise EmbedrankError(f"verify: engine {engine!r} is not one of {', '.join(ENGINES)}")
    if buckets is not None and buckets < 1:
        raise EmbedrankError(f"verify: buckets must be at least 1, not {buckets}")
    root, job, commits = open_committed(output, storage_options)
    rerank = is_rerank(job)
    top_k = job["fingerprint"].get("top_k")
    ranks = list(root.ranks_of(commits).values()) if rerank else []
    files = named_files(job, commits, ranks, rerank)
    rows = sum(n.ref.rows for n in files)
    if engine == "auto":
        engine = "local" if rows <= AUTO_LOCAL_MAX_ROWS else "ray"
    report = Report(checked={"mode": "quick" if quick else "full", "engine": "none",
                             "commits": len(commits) + len(ranks), "files": len(files), "rows": rows,
                             "bytes": sum(n.ref.bytes or 0 for n in files)})
    counts: collections.Counter = collections.Counter(items=len(job["items"]))
    _check_commits(job, commits, report, counts)
    if quick:
        _check_sizes(root, files, report)
        for c in commits.values():
            counts["rows"] += sum(f.rows for f in c.files)
            counts["rejected"] += 0 if c.bad_file else sum(f.rows for f in c.rejects)
    else:
        results, dups, ran = (_run_ray if engine == "ray" else _run_local)(root, files, top_k, buckets,
                                                                           expected_vectors(job["fingerprint"]))
        report.checked.update(ran)
        _compose(job, commits, files, results, dups, rerank, report, counts)
    if rerank:
        _check_rank_commits(ranks, top_k, counts["rows"], report, counts)
    orphans = root.orphans(commits.values())
    counts["orphans"] = len(orphans)
    counts["pending_uploads"] = len(root.storage.pending_uploads())
    if root.read_success() is not None:
        if orphans:
            report.problems.append(f"{len(orphans)} piece file(s) that no commit names")
        if counts["pending_uploads"]:
            report.problems.append(f"{counts['pending_uploads']} multipart upload(s) left pending under the output")
    report.counts = dict(counts)
    return report
