"""The output root: the control files of one output, read and written as typed records.

Layout: `data/`, `_scores/` and `_rejects/` hold pieces; `_commits/<item>.json`
is the commit point of one work item and names exactly the files that tile it;
`_rank_commits/<bucket>.json` does the same for one ranked bucket of a rerank
job; `_job.json` records fingerprint and plan; `_SUCCESS` closes a finished
run; `_lock.json` names the one writer. Files no commit names are orphans of
crashed attempts and are deleted: the records themselves are read when deleting
(each piece's own item record by name, not only a listing), and pieces that no
record commits yet are given `ORPHAN_GRACE_S` before they go.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Collection, Iterable
from typing import Any

from common import failpoints
from common.errors import OutputError
from pipelines.fingerprint import describe_difference
from pipelines.input.plan import WorkItem
from pipelines.output.lock import fence
from pipelines.output.pieces import PIECE_DIRS
from pipelines.output.records import ItemCommit, RankCommit, Totals, now
from pipelines.storage import PreconditionFailed, Storage

COMMITS_DIR = "_commits"
RANK_COMMITS_DIR = "_rank_commits"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"

ORPHAN_GRACE_S = 600.0
"""How long a piece that no commit record names, of an item or rank bucket that has no record yet, is kept: a
writer may be about to commit it (a piece is written before its record). Once the item's record exists, it names
the item's files for good (records are created once), and its other pieces go at once."""

_ITEM_PIECE = re.compile(r"([0-9a-f]{20})-.+\.parquet")
_RANK_PIECE = re.compile(r"rank-(\d+)-.+\.parquet")


def _now() -> float:
    """The wall clock the grace period is measured by (store times are wall-clock times too)."""
    return time.time()


def _owner(path: str) -> tuple[str, str] | None:
    """The record that could name a piece, from its file name: (`_commits`, item id) for
    `<item>-<first>-<last>-<hash>.parquet` and `<item>-file-<hash>.parquet`, (`_rank_commits`, `bucket-<n>`) for
    `rank-<n>-<hash>.parquet`; None for a name no writer of this version makes."""
    name = posixpath.basename(path)
    item = _ITEM_PIECE.fullmatch(name)
    if item:
        return COMMITS_DIR, item.group(1)
    rank = _RANK_PIECE.fullmatch(name)
    if rank:
        return RANK_COMMITS_DIR, f"bucket-{int(rank.group(1)):05d}"
    return None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


class OutputRoot:
    """Reads and writes the control files of one output root."""

    def __init__(self, storage: Storage, orphan_grace_s: float = ORPHAN_GRACE_S):
        self.storage = storage
        self.orphan_grace_s = orphan_grace_s
        """`remove_orphans` keeps unnamed pieces of not yet committed items this long (`ORPHAN_GRACE_S`)."""
        self._adopted: dict[str, ItemCommit] = {}
        """Records another writer created first (`write_commit`): their files are not orphans."""

    def read_json(self, rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(rel))
        except FileNotFoundError:
            return None

    def read_job(self) -> dict[str, Any] | None:
        return self.read_json(JOB_FILE)

    def planned_item_ids(self) -> list[str]:
        """The work items `_job.json` records, in plan order ([] before the first run)."""
        job = self.read_job()
        return [i["item_id"] for i in job["items"]] if job else []

    def _names(self, folder: str) -> list[str]:
        return [p.rsplit("/", 1)[-1][: -len(".json")] for p in self.storage.list_files(folder) if p.endswith(".json")]

    def commit_ids(self) -> list[str]:
        return self._names(COMMITS_DIR)

    def read_commits(self, item_ids: Iterable[str] | None = None, max_workers: int = 16) -> dict[str, ItemCommit]:
        ids = list(self.commit_ids() if item_ids is None else item_ids)
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            found = pool.map(lambda i: self.read_json(f"{COMMITS_DIR}/{i}.json"), ids)
        return {i: ItemCommit.from_json(c) for i, c in zip(ids, found) if c is not None}

    def read_planned_commits(self) -> dict[str, ItemCommit]:
        """The commits of the items `_job.json` plans, in plan order."""
        return self.read_commits(self.planned_item_ids())

    def prepare(self, fingerprint: dict[str, Any], fp_id: str, items: list[WorkItem],
                recorded_config: dict[str, Any]) -> dict[str, ItemCommit]:
        """Check the fingerprint, record the job, drop orphans; returns the existing commits."""
        job = self.read_job()
        if job is not None and job.get("fingerprint_id") != fp_id:
            raise OutputError(
                f"{self.storage.url} holds output of a different job; refusing to mix vectors "
                f"({describe_difference(job.get('fingerprint', {}), fingerprint)}). "
                "Use a new output.path, or restore the original settings to resume."
            )
        commits = self.read_commits()
        planned = {i.item_id for i in items}
        foreign = [c for c in commits.values() if c.fingerprint_id != fp_id]
        if foreign:
            raise OutputError(f"{self.storage.url}: {len(foreign)} commit(s) carry another fingerprint")
        stale = sorted(set(commits) - planned)
        if stale:
            raise OutputError(self._stale_message([commits[i] for i in stale], items))
        fence(self.storage)
        self.storage.write_bytes(JOB_FILE, _dumps({
            "fingerprint": fingerprint, "fingerprint_id": fp_id, "config": recorded_config,
            "items": [i.to_dict() for i in items], "updated_at": now(),
        }))
        if self.storage.exists(SUCCESS_FILE):
            self.storage.delete([SUCCESS_FILE])
        self.remove_orphans(commits, planned)
        return commits

    def _stale_message(self, stale: list[ItemCommit], items: list[WorkItem]) -> str:
        """Why committed items are not in the plan, naming their input files: changed (still listed, with another
        size or version, or cut otherwise) or no longer listed (removed, or input.paths differs)."""
        listed = {i.rel for i in items}
        sources = sorted({c.source for c in stale if c.source})
        changed = [s for s in sources if s in listed]
        gone = [s for s in sources if s not in listed]

        def some(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

        why = []
        if changed:
            why.append("changed since they were committed (size or ETag/mtime differ), or cut into work items "
                       f"otherwise (input.rows_per_item or input.jsonl_item_mb differs): {some(changed)}")
        if gone:
            why.append(f"no longer listed (removed, or input.paths differs): {some(gone)}")
        if not why:
            why.append(f"e.g. item {stale[0].item}")
        return (f"{self.storage.url}: {len(stale)} committed item(s) are not in the current plan; their input "
                f"file(s) {'; '.join(why)}. Committed output is never mixed with another version of its input: "
                "take changed inputs in with `embedrank reindex` (an index re-embeds only what changed), or use a "
                "new output.path.")

    def read_rank_commits(self, names: Iterable[str] | None = None, max_workers: int = 16) -> dict[str, RankCommit]:
        """The rank commits listed under `_rank_commits/` (or those of `names`, read directly), by name."""
        names = list(self._names(RANK_COMMITS_DIR) if names is None else names)
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            found = pool.map(lambda n: self.read_json(f"{RANK_COMMITS_DIR}/{n}.json"), names)
        return {n: RankCommit.from_json(c) for n, c in sorted(zip(names, found)) if c is not None}

    def drop_rank_commits(self) -> int:
        """Ranks depend on every score: new scores invalidate them (their files become orphans)."""
        stale = self.storage.list_files(RANK_COMMITS_DIR)
        fence(self.storage)
        self.storage.delete(stale)
        return len(stale)

    def write_rank_commit(self, record: RankCommit) -> None:
        fence(self.storage)
        self.storage.write_bytes(f"{RANK_COMMITS_DIR}/{record.name}.json", _dumps(record.to_json()))

    def orphans(self, commits: Iterable[ItemCommit], grace_s: float = 0.0,
                planned: Collection[str] | None = None) -> list[str]:
        """Piece files that no commit record names: neither one of `commits` (records as the store holds them: read
        from it, or returned by `write_commit`) nor any record in the store now.

        The store's records are read, not only listed: those a listing of `_commits/` shows that `commits` lacks,
        and, for each piece left, the record of its own item (`_commits/<item>.json`, from the piece's name) or
        rank bucket, read directly, so a listing that misses a record cannot doom its files. A piece whose item
        (or bucket) has a record that does not name it is an orphan whatever its age; one whose item has no record
        yet is an orphan only once older than `grace_s` (0: at once, as `embedrank verify` counts them), unless
        its item is not one of the `planned` items: then nothing will ever commit it."""
        commits = list(commits)
        modified = {p: t for d in PIECE_DIRS for p, t in self.storage.list_files_modified(d).items()}
        named = {p for c in [*commits, *self._adopted.values()] for p in c.named_paths}
        left = [p for p in modified if p not in named]
        if not left:
            return []
        owners = {p: _owner(p) for p in left}
        owned = {folder: {o[1] for o in owners.values() if o and o[0] == folder}
                 for folder in (COMMITS_DIR, RANK_COMMITS_DIR)}
        in_memory = {c.item for c in commits} | set(self._adopted)
        stored = self.read_commits(sorted((set(self.commit_ids()) - in_memory) | owned[COMMITS_DIR]))
        ranks = self.read_rank_commits(sorted(set(self._names(RANK_COMMITS_DIR)) | owned[RANK_COMMITS_DIR]))
        named |= {p for c in [*stored.values(), *ranks.values()] for p in c.named_paths}
        recorded = {(COMMITS_DIR, i) for i in [*in_memory, *stored]} | {(RANK_COMMITS_DIR, n) for n in ranks}
        now = _now()

        def dead(path: str) -> bool:
            if path in named:
                return False
            if owners[path] in recorded:  # its record exists and never names it: nobody can commit it any more
                return True
            owner = owners[path]
            if planned is not None and (owner is None or (owner[0] == COMMITS_DIR and owner[1] not in planned)):
                return True  # a piece of no planned item (or a name no writer makes): nobody will ever commit it
            mtime = modified[path]
            return grace_s <= 0 or mtime is None or now - mtime >= grace_s

        return [p for p in left if dead(p)]

    def remove_orphans(self, commits: dict[str, ItemCommit], planned: Collection[str] | None = None) -> list[str]:
        """Delete piece files that no commit record names (`orphans`, with `orphan_grace_s`), and abort unfinished
        uploads.

        Only the lock holder calls this, before its graph starts or after it ends: no upload of its own is live."""
        orphans = self.orphans(commits.values(), self.orphan_grace_s, planned)
        for start in range(0, len(orphans), 1000):  # fenced per batch: a lost lock stops the deletes
            fence(self.storage)
            self.storage.delete(orphans[start:start + 1000])
        fence(self.storage)
        self.storage.abort_pending_uploads()
        return orphans

    def write_commit(self, record: ItemCommit) -> ItemCommit:
        """The commit point of an item: one atomic create-if-absent (`If-None-Match: *` on S3, an exclusive link
        of a complete temp file locally), fenced by the lock. Returns the record that is committed: if one for
        the same item and fingerprint exists already (another writer, or a retried PUT, was first), that one."""
        failpoints.hit("before_commit_write")
        fence(self.storage)
        rel = f"{COMMITS_DIR}/{record.item}.json"
        try:
            self.storage.create(rel, _dumps(record.to_json()))
        except PreconditionFailed:
            found = self.read_json(rel)
            existing = ItemCommit.from_json(found) if found is not None else None
            if existing is None or (existing.item, existing.fingerprint_id) != (record.item, record.fingerprint_id):
                raise OutputError(f"{self.storage.url}: {rel} was written by another writer with other contents; "
                                  "refusing to overwrite a commit record") from None
            self._adopted[record.item] = existing
            record = existing
        failpoints.hit("after_commit_write")
        return record

    def write_success(self, totals: Totals) -> None:
        fence(self.storage)
        self.storage.write_bytes(SUCCESS_FILE, _dumps({**totals.to_json(), "finished_at": now()}))
