"""The output root: the control files of one output, read and written as typed records.

Layout: `data/`, `_scores/` and `_rejects/` hold pieces; `_commits/<item>.json`
is the commit point of one work item and names exactly the files that tile it;
`_rank_commits/<bucket>.json` does the same for one ranked bucket of a rerank
job; `_job.json` records fingerprint and plan; `_SUCCESS` closes a finished
run; `_lock.json` names the one writer. Files no commit names are orphans of
crashed attempts and are deleted.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

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


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


class OutputRoot:
    """Reads and writes the control files of one output root."""

    def __init__(self, storage: Storage):
        self.storage = storage
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
            raise OutputError(
                f"{self.storage.url}: {len(stale)} committed item(s) are not in the current plan "
                f"(input files changed or input.paths differs; e.g. {stale[0]}). Use a new output.path."
            )
        fence(self.storage)
        self.storage.write_bytes(JOB_FILE, _dumps({
            "fingerprint": fingerprint, "fingerprint_id": fp_id, "config": recorded_config,
            "items": [i.to_dict() for i in items], "updated_at": now(),
        }))
        if self.storage.exists(SUCCESS_FILE):
            self.storage.delete([SUCCESS_FILE])
        self.remove_orphans(commits)
        return commits

    def read_rank_commits(self) -> dict[str, RankCommit]:
        found = {n: self.read_json(f"{RANK_COMMITS_DIR}/{n}.json") for n in self._names(RANK_COMMITS_DIR)}
        return {n: RankCommit.from_json(c) for n, c in sorted(found.items()) if c is not None}

    def drop_rank_commits(self) -> int:
        """Ranks depend on every score: new scores invalidate them (their files become orphans)."""
        stale = self.storage.list_files(RANK_COMMITS_DIR)
        fence(self.storage)
        self.storage.delete(stale)
        return len(stale)

    def write_rank_commit(self, record: RankCommit) -> None:
        fence(self.storage)
        self.storage.write_bytes(f"{RANK_COMMITS_DIR}/{record.name}.json", _dumps(record.to_json()))

    def orphans(self, commits: Iterable[ItemCommit]) -> list[str]:
        """Piece files that neither one of `commits` nor a rank commit names."""
        named = {p for c in [*commits, *self._adopted.values(), *self.read_rank_commits().values()]
                 for p in c.named_paths}
        return [p for d in PIECE_DIRS for p in self.storage.list_files(d) if p not in named]

    def remove_orphans(self, commits: dict[str, ItemCommit]) -> list[str]:
        """Delete piece files that neither an item commit nor a rank commit names, and abort unfinished uploads.

        Only the lock holder calls this, before its graph starts or after it ends: no upload of its own is live."""
        orphans = self.orphans(commits.values())
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
