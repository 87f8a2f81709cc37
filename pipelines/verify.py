"""Reading committed output and checking the exactly-once invariant.

Readers never glob `data/`: the committed rows are exactly the files that the
commits of the planned items name.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.commit import SUCCESS_FILE, OutputRoot
from pipelines.errors import OutputError
from pipelines.storage import Storage
from pipelines.writing import PIECE_DIRS


def _root(output: str, storage_options: dict[str, Any] | None) -> tuple[OutputRoot, dict[str, Any], dict]:
    root = OutputRoot(Storage(output, storage_options))
    job = root.read_job()
    if job is None:
        raise OutputError(f"{output}: no _job.json; not an embedrank output (or nothing was run yet)")
    commits = root.read_commits([i["item_id"] for i in job["items"]])
    return root, job, commits


def read_committed(output: str, storage_options: dict[str, Any] | None = None, *,
                   rejects: bool = False) -> pa.Table:
    """All committed rows (or rejects) of an output, as one pyarrow Table, in plan order."""
    root, job, commits = _root(output, storage_options)
    key = "rejects" if rejects else "files"
    tables = [pq.read_table(io.BytesIO(root.storage.read_bytes(f["path"])))
              for i in job["items"] if i["item_id"] in commits for f in commits[i["item_id"]][key]]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)


@dataclasses.dataclass
class Report:
    problems: list[str] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_output(output: str, storage_options: dict[str, Any] | None = None) -> Report:
    """Check every planned item is committed once, every named file matches, every id appears once."""
    root, job, commits = _root(output, storage_options)
    report = Report()
    ids: collections.Counter[str] = collections.Counter()
    counts = collections.Counter(items=len(job["items"]))
    for item in job["items"]:
        commit = commits.get(item["item_id"])
        if commit is None:
            report.problems.append(f"item {item['item_id']} ({item['rel']}) is not committed")
            continue
        counts["committed_items"] += 1
        if commit["fingerprint_id"] != job["fingerprint_id"]:
            report.problems.append(f"commit {item['item_id']} has another fingerprint")
        expected = commit["row_end"] - commit["row_start"]
        if item["row_end"] is not None and expected != item["row_end"] - item["row_start"]:
            report.problems.append(f"commit {item['item_id']} covers {expected} rows, plan says otherwise")
        seen = 0
        for kind, files in (("rows", commit["files"]), ("rejected", commit["rejects"])):
            for f in files:
                try:
                    data = root.storage.read_bytes(f["path"])
                except FileNotFoundError:
                    report.problems.append(f"{f['path']} named by commit {item['item_id']} is missing")
                    continue
                if hashlib.sha256(data).hexdigest() != f["sha256"]:
                    report.problems.append(f"{f['path']}: checksum differs from its commit")
                table = pq.read_table(io.BytesIO(data), columns=["id"])
                if table.num_rows != f["rows"]:
                    report.problems.append(f"{f['path']}: {table.num_rows} rows, commit says {f['rows']}")
                ids.update(x for x in table.column("id").to_pylist() if x is not None)
                counts[kind] += table.num_rows
                seen += table.num_rows
        if seen != expected:
            report.problems.append(f"commit {item['item_id']}: files hold {seen} rows, item has {expected}")
    dupes = [i for i, n in ids.items() if n > 1]
    if dupes:
        report.problems.append(f"{len(dupes)} id(s) appear more than once (e.g. {dupes[0]!r})")
    named = {f["path"] for c in commits.values() for f in c["files"] + c["rejects"]}
    orphans = [p for d in PIECE_DIRS for p in root.storage.list_files(d) if p not in named]
    counts["orphans"] = len(orphans)
    if orphans and root.storage.exists(SUCCESS_FILE):
        report.problems.append(f"{len(orphans)} file(s) under data/ or _rejects/ that no commit names")
    counts["unique_ids"] = len(ids)
    report.counts = dict(counts)
    return report
