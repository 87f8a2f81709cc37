"""`embedrank verify`: the exactly-once invariant of an output, checked against its commit records.

For input ids I, output ids O and rejected ids R: O ∪ R = I, O ∩ R = ∅, no id twice; every file a commit
names exists and matches its recorded row count and checksum; no piece file is left that no commit names.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.output.reader import is_rerank, open_committed
from pipelines.output.records import FileRef, ItemCommit
from pipelines.output.root import SUCCESS_FILE, OutputRoot


@dataclasses.dataclass
class Report:
    problems: list[str] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _load_checked(root: OutputRoot, f: FileRef, owner: str, report: Report) -> pa.Table | None:
    """A file a commit names, checked against the commit's checksum and row count."""
    try:
        data = root.storage.read_bytes(f.path)
    except FileNotFoundError:
        report.problems.append(f"{f.path} named by {owner} is missing")
        return None
    if hashlib.sha256(data).hexdigest() != f.sha256:
        report.problems.append(f"{f.path}: checksum differs from {owner}")
    table = pq.read_table(io.BytesIO(data))
    if table.num_rows != f.rows:
        report.problems.append(f"{f.path}: {table.num_rows} rows, {owner} says {f.rows}")
    return table


def _check_file_reject(root: OutputRoot, commit: ItemCommit, report: Report) -> None:
    """A file rejected whole commits no rows and exactly one `_rejects/` marker naming its reason."""
    owner = f"commit {commit.item}"
    if commit.files or commit.rows or len(commit.rejects) != 1:
        report.problems.append(f"{owner} rejects its file whole but names rows or no single marker")
        return
    table = _load_checked(root, commit.rejects[0], owner, report)
    if table is not None and table.column("reason").to_pylist() != [commit.bad_file.reason]:
        report.problems.append(f"{owner}: its file-reject marker does not carry the reason {commit.bad_file}")


def _check_items(root: OutputRoot, job: dict, commits: dict[str, ItemCommit], report: Report, rerank: bool,
                 counts: collections.Counter) -> collections.Counter:
    """Every planned item committed; its files tile it; returns how often each row key was seen."""
    keys: collections.Counter = collections.Counter()
    for item in job["items"]:
        commit = commits.get(item["item_id"])
        if commit is None:
            report.problems.append(f"item {item['item_id']} ({item['rel']}) is not committed")
            continue
        counts["committed_items"] += 1
        if commit.fingerprint_id != job["fingerprint_id"]:
            report.problems.append(f"commit {item['item_id']} has another fingerprint")
        if commit.bad_file:
            _check_file_reject(root, commit, report)
            counts["rejected_files"] += 1
            continue
        expected = commit.row_end - commit.row_start
        if item["row_end"] is not None and expected != item["row_end"] - item["row_start"]:
            report.problems.append(f"commit {item['item_id']} covers {expected} rows, the plan says otherwise")
        seen = 0
        for kind, files in (("rows", commit.files), ("rejected", commit.rejects)):
            for f in files:
                table = _load_checked(root, f, f"commit {item['item_id']}", report)
                if table is None:
                    continue
                if rerank or kind == "rejected":
                    rows = table.column("_row" if kind == "rows" else "row").to_pylist()
                    keys.update((item["item_id"], r) for r in rows)
                if not rerank:
                    keys.update(("id", x) for x in table.column("id").to_pylist() if x is not None)
                counts[kind] += table.num_rows
                seen += table.num_rows
        if seen != expected:
            report.problems.append(f"commit {item['item_id']}: files hold {seen} rows, the item has {expected}")
    return keys


def _check_ranks(root: OutputRoot, job: dict, report: Report, counts: collections.Counter) -> None:
    ranks = list(root.read_rank_commits().values())
    top_k = job["fingerprint"].get("top_k")
    tables = []
    for c in ranks:
        for f in c.files:
            t = _load_checked(root, f, f"rank commit {c.bucket}", report)
            if t is not None:
                tables.append(t.select(["query_id", "doc_id", "rank"]))
        for f in c.rejects:
            _load_checked(root, f, f"rank commit {c.bucket}", report)
    counts["ranked_rows"] = sum(c.rows for c in ranks)
    counts["duplicate_pairs"] = sum(c.rejected for c in ranks)
    if sum(c.scored for c in ranks) != counts["rows"]:
        report.problems.append(f"rank commits cover {sum(c.scored for c in ranks)} scored pairs of "
                               f"{counts['rows']}")
    if not tables:
        return
    ranked = pa.concat_tables(tables).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    pairs = collections.Counter(zip(ranked.column("query_id").to_pylist(), ranked.column("doc_id").to_pylist()))
    if any(n > 1 for n in pairs.values()):
        report.problems.append("a (query_id, doc_id) pair appears more than once in the ranked output")
    q = ranked.column("query_id").to_pylist()
    r = np.asarray(ranked.column("rank").to_numpy())
    starts = [0] + [i for i in range(1, len(q)) if q[i] != q[i - 1]] + [len(q)]
    for a, b in zip(starts[:-1], starts[1:]):
        if not np.array_equal(r[a:b], np.arange(1, b - a + 1)) or (top_k and b - a > top_k):
            report.problems.append(f"ranks of query {q[a]!r} are not 1..n (top_k={top_k})")
            break
    counts["queries"] = len(starts) - 1
    if top_k is None and counts["ranked_rows"] + counts["duplicate_pairs"] != counts["rows"]:
        report.problems.append("ranked rows + duplicate pairs differ from scored pairs")


def verify_output(output: str, storage_options: dict[str, Any] | None = None) -> Report:
    """Check every planned item is committed once, every named file matches, every row appears once."""
    root, job, commits = open_committed(output, storage_options)
    rerank = is_rerank(job)
    report = Report()
    counts: collections.Counter = collections.Counter(items=len(job["items"]))
    keys = _check_items(root, job, commits, report, rerank, counts)
    twice = [k for k, n in keys.items() if n > 1]
    if twice:
        report.problems.append(f"{len(twice)} row(s)/id(s) appear more than once (e.g. {twice[0]!r})")
    if rerank:
        _check_ranks(root, job, report, counts)
    orphans = root.orphans(commits.values())
    counts["orphans"] = len(orphans)
    counts["pending_uploads"] = len(root.storage.pending_uploads())
    if root.storage.exists(SUCCESS_FILE):
        if orphans:
            report.problems.append(f"{len(orphans)} piece file(s) that no commit names")
        if counts["pending_uploads"]:
            report.problems.append(f"{counts['pending_uploads']} multipart upload(s) left pending under the output")
    counts["unique_ids" if not rerank else "unique_rows"] = len(keys) if rerank else sum(
        1 for k in keys if k[0] == "id")
    report.counts = dict(counts)
    return report
