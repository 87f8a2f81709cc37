"""What a reindex decides on the driver from small records: which items keep committed files by content digest,
which diff task compares which input file with which base files, and how the documents the diff tasks could not
match locally pair up (moved between files) or not (new, deleted).

Everything here is O(items) or O(documents the local joins left unmatched), never O(corpus): an unmatched
document is new, deleted, or moved between files. A moved document is counted as unchanged or changed like any
other and carries its vector when unchanged: its item's build task reads the base file it came from too (the
ids that moved are few, so the file is read once more by one task, which is cheaper than a cluster shuffle of
every row and keeps the counts exact and the vectors the ones first computed). A snapshot that moves most ids
between files *and* changes them sends that many (id, hash) pairs here; that is the case the per-file design
does not make cheap.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Callable
from typing import Any

from pipelines.input.plan import WorkItem
from pipelines.output.records import ItemCommit


def keepable(commit: ItemCommit) -> bool:
    """A committed item whose files can serve another item of equal digest: data rows only, no rejects."""
    return commit.bad_file is None and not commit.rejects and commit.rejected == 0


def keep_by_digest(items: list[WorkItem], digests: dict[str, str | None], candidates: dict[str, ItemCommit],
                   base_digests: dict[str, str]) -> dict[str, str]:
    """New item id → the base item (among `candidates`) whose content digest it has, one to one; a base item of
    the same file is preferred, then the first in base order. Items without a digest are never kept."""
    by_digest: dict[str, list[str]] = {}
    for name, commit in candidates.items():
        digest = base_digests.get(name)
        if digest and keepable(commit):
            by_digest.setdefault(digest, []).append(name)
    kept: dict[str, str] = {}
    for item in items:
        found = by_digest.get(digests.get(item.item_id) or "")
        if not found:
            continue
        pick = next((b for b in found if candidates[b].source == item.rel), found[0])
        if item.row_end is not None and candidates[pick].rows != item.row_end - item.row_start:
            continue  # cannot happen for an equal digest of a parquet item; a guard, not a path
        found.remove(pick)
        kept[item.item_id] = pick
    return kept


def kept_commit(base: ItemCommit, item: WorkItem, rebase: Callable[[str], str], from_version: str) -> ItemCommit:
    """The base item's record as the new item keeps it: the new item's id, file and rows, the base's files
    (rebased paths; their row ranges moved to the new item's), every row counted as carried."""
    record = base.by_reference(rebase, from_version)
    shift = item.row_start - base.row_start
    files = tuple(dataclasses.replace(f, first_row=None if f.first_row is None else f.first_row + shift,
                                      end_row=None if f.end_row is None else f.end_row + shift) for f in record.files)
    row_end = item.row_end if item.row_end is not None else item.row_start + base.row_end - base.row_start
    return dataclasses.replace(record, item=item.item_id, source=item.rel, row_start=item.row_start,
                               row_end=row_end, files=files)


def base_files_by_source(base_name: str, commits: dict[str, ItemCommit]) -> dict[str, list[str]]:
    """Input file (relative path) → the data files (relative to the index root) of the base items read from it."""
    out: dict[str, list[str]] = {}
    for c in commits.values():
        out.setdefault(c.source, []).extend(posixpath.normpath(posixpath.join(base_name, f.path)) for f in c.files)
    return out


def diff_tasks(items: list[WorkItem], by_source: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One task per input file: its items and the base files of the same file; then one per base file family
    that no new item shares a name with (its documents are deleted or moved)."""
    by_rel: dict[str, list[WorkItem]] = {}
    for item in items:
        by_rel.setdefault(item.rel, []).append(item)
    tasks = [{"items": [i.to_dict() for i in group], "base_files": by_source.get(rel, [])}
             for rel, group in by_rel.items()]
    tasks += [{"items": [], "base_files": files} for source, files in by_source.items()
              if source not in by_rel and files]
    return tasks


def resolve(results: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """The diff tasks' results → exact counts (new, changed, unchanged, deleted, rejected) and, per item, the base
    files its moved unchanged documents carry their vectors from."""
    counts = {"new": 0, "changed": 0, "unchanged": 0, "deleted": 0, "rejected": 0}
    gone: dict[str, list[tuple[str, str]]] = {}
    for r in results:
        for kind in ("unchanged", "changed", "rejected"):
            counts[kind] += r[kind]
        for doc, content, path in r["gone"]:
            gone.setdefault(doc, []).append((content, path))
    moved: dict[str, set[str]] = {}
    for r in results:
        for doc, content, item in r["new"]:
            there = gone.get(doc)
            if not there:
                counts["new"] += 1
                continue
            same = next((k for k, (h, _) in enumerate(there) if h == content), None)
            if same is None:
                there.pop(0)
                counts["changed"] += 1
            else:
                moved.setdefault(item, set()).add(there.pop(same)[1])
                counts["unchanged"] += 1
    counts["deleted"] = sum(len(v) for v in gone.values())
    return counts, {item: sorted(paths) for item, paths in moved.items()}
