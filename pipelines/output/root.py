"""The output root: the control files of one output, read and written as typed records.

Layout: `data/`, `_scores/` and `_rejects/` hold pieces; `_commits/<item>.json`
is the commit point of one work item and names exactly the files that tile it;
`_rank_commits/<bucket>.json` does the same for one ranked bucket of a rerank
job; `_job.json` records fingerprint, config and a plan header whose items lie
in `_plan/<digest>/` shards (`plan_store`); `_commits_snapshot.parquet` caches
the records so that a resume need not GET each (`commit_snapshot`); `_SUCCESS`
closes a finished run (valid only while its epoch is `_job.json`'s); `_lock.json` names the one writer
and its lease epoch. Files no commit names are orphans of crashed attempts and are deleted: the records
themselves are read when deleting (each piece's own item record by name, not only a listing). What the
store enforces for each write and delete here is listed in `pipelines.output.control`: files carry their
writer's epoch in their names, records and control files carry it inside, and a late writer's act is
refused by the store or harmless.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common import failpoints
from common.errors import LockLost, OutputError
from pipelines.fingerprint import describe_difference
from pipelines.input.plan import PreviousPlan, WorkItem
from pipelines.output import commit_snapshot, plan_store
from pipelines.output.control import delete_control, file_epoch, read_control, record_epoch, write_control
from pipelines.output.lock import fence, held_epoch
from pipelines.output.pieces import PIECE_DIRS
from pipelines.output.records import ItemCommit, RankCommit, Totals, now, scores_digest
from pipelines.storage import PreconditionFailed, Storage

COMMITS_DIR = "_commits"
RANK_COMMITS_DIR = "_rank_commits"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"

COMMIT_READERS = 64
"""Commit records GET at once. Against the local test server the reads are CPU-bound (20,000 records: 86 s at 16
threads, 96 s at 64 on 2 shared cores, `benchmarks/control_plane.py`); 64 is for a remote store's tens of ms per
GET, which 16 threads would cap at a few hundred records a second. The commit snapshot makes them rare."""

SNAPSHOT_EVERY = 1000
"""The lock holder rewrites the commit snapshot after this many new records, so a run that crashes leaves at most
this many for the next resume to GET one by one (rewriting it costs one listing of `_commits/` and one PUT)."""

SNAPSHOT_MIN_IDS = 64
"""`read_commits` of this many ids or more lists `_commits/` and reads the commit snapshot first."""

ORPHAN_GRACE_S = 600.0
"""How long a piece that no commit record names, of an item or rank bucket that has no record yet, is kept by a
sweep that does not know the plan: a writer may be about to commit it (a piece is written before its record).
A sweep that knows the plan keeps such pieces of planned items whatever their age (they are settled when the item
commits); once the item's record exists, its other pieces go at once."""

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
        self._known: dict[str, ItemCommit] = {}
        """Every record this writer read at `prepare` or committed since: what the next snapshot holds."""
        self._unsnapshotted = 0
        self._snapshot_lock = threading.Lock()

    @property
    def epoch(self) -> int:
        """The lease epoch this process holds on the output (0 without a lock)."""
        return held_epoch(self.storage)

    def _listed_pieces(self, folders: Iterable[str] = PIECE_DIRS) -> dict[str, float | None]:
        return {p: t for d in folders for p, t in self.storage.list_files_modified(d).items()}

    def missing_files(self, records: Iterable[ItemCommit | RankCommit],
                      listed: Collection[str] | None = None) -> dict[str, list[str]]:
        """Per record (item id or rank bucket name), the files it names that the store does not hold: a record
        written late by a writer that lost its lease, naming pieces that were swept meanwhile, or files removed by
        hand. One listing per folder (this root's piece folders: `listed` if the caller has it; an older index
        version's for paths that climb out of this root), not a request per file."""
        records = list(records)
        present: set[str] = set(listed) if listed is not None else set()
        folders: set[str] = set()
        for record in records:
            for path in record.named_paths:
                parts = posixpath.normpath(path).split("/")
                cut = next((k for k, part in enumerate(parts) if part in PIECE_DIRS), len(parts) - 2)
                folders.add("/".join(parts[:cut + 1]))
        for folder in sorted(folders):
            if listed is None or folder.startswith(".."):
                present |= {posixpath.normpath(p) for p in self.storage.list_files(folder)}
        missing = {}
        for record in records:
            gone = [p for p in record.named_paths if posixpath.normpath(p) not in present]
            if gone:
                missing[record.item if isinstance(record, ItemCommit) else record.name] = gone
        return missing

    def read_json(self, rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(rel))
        except FileNotFoundError:
            return None

    def read_job_header(self) -> dict[str, Any] | None:
        """`_job.json` as stored: fingerprint, config, `updated_at` and the plan header (`plan_store.header`),
        without reading the plan's items (an output written before shards holds them inline under `items`)."""
        return self.read_json(JOB_FILE)

    def previous_plan(self) -> PreviousPlan | None:
        """The stored plan a new plan may take unchanged files' items from (`make_plan`); None when there is none
        or it cannot be read (planning then reads every footer, and the run reports any store error itself)."""
        try:
            return plan_store.previous_plan(self.storage, self.read_job_header())
        except Exception:  # noqa: BLE001 - an optional read (no credentials, no bucket yet, ...): read footers
            return None

    def read_job(self) -> dict[str, Any] | None:
        """`_job.json` with every planned item under `items` (dicts, in plan order), however they are stored.
        Holds the whole plan: prefer `read_job_header` with `iter_planned_items` / `planned_item_ids`."""
        job = self.read_job_header()
        if job is None or "plan" not in job:
            return job
        return {**job, "items": [i.to_dict() for shard in self.iter_planned_items(job) for i in shard]}

    def iter_planned_items(self, job: dict[str, Any] | None = None) -> Iterator[list[WorkItem]]:
        """The planned work items, a shard (a few thousand) at a time, in plan order (none before the first run)."""
        job = self.read_job_header() if job is None else job
        return plan_store.iter_items(self.storage, job) if job else iter(())

    def iter_planned_ids(self, job: dict[str, Any] | None = None) -> Iterator[list[str]]:
        """The planned item ids, a shard at a time, in plan order."""
        job = self.read_job_header() if job is None else job
        return plan_store.iter_item_ids(self.storage, job) if job else iter(())

    def planned_item_ids(self, job: dict[str, Any] | None = None) -> list[str]:
        """The work items `_job.json` plans, in plan order ([] before the first run)."""
        return [i for ids in self.iter_planned_ids(job) for i in ids]

    def iter_planned_commits(self, job: dict[str, Any] | None = None,
                             max_workers: int = COMMIT_READERS) -> Iterator[dict[str, ItemCommit]]:
        """The commits of the planned items, a plan shard at a time, in plan order (uncommitted items left out):
        one listing of `_commits/`, records from the commit snapshot where it is current (`read_listed_commits`);
        apart from the listing and snapshot, memory follows one shard, not the job."""
        listed = commit_snapshot.listed_versions(self.storage, COMMITS_DIR)
        snapshot = commit_snapshot.read_snapshot(self.storage) if listed else {}
        for ids in self.iter_planned_ids(job):
            yield self.read_listed_commits(ids, listed, snapshot, max_workers)[0]

    def _names(self, folder: str) -> list[str]:
        return [p.rsplit("/", 1)[-1][: -len(".json")] for p in self.storage.list_files(folder) if p.endswith(".json")]

    def commit_ids(self) -> list[str]:
        return self._names(COMMITS_DIR)

    def read_commits(self, item_ids: Iterable[str] | None = None,
                     max_workers: int = COMMIT_READERS) -> dict[str, ItemCommit]:
        """The commit records of `item_ids` (default: every one `_commits/` lists), by id, in that order; those
        absent are left out. With `SNAPSHOT_MIN_IDS` ids or more, those the commit snapshot holds at the version
        `_commits/` lists come from it (`commit_snapshot`: one LIST and one GET instead of a GET each); every
        other id is one GET, `max_workers` at once (listed or not: an id a listing misses is still read)."""
        if item_ids is None:
            return self.read_listed_commits()[0]
        ids = list(item_ids)
        held: dict[str, ItemCommit] = {}
        if len(ids) >= SNAPSHOT_MIN_IDS:
            listed = commit_snapshot.listed_versions(self.storage, COMMITS_DIR)
            if listed:
                held = commit_snapshot.from_snapshot(commit_snapshot.read_snapshot(self.storage), listed, ids)
        fetched = self._get_commits([i for i in ids if i not in held], max_workers)
        return {i: held.get(i) or fetched[i] for i in ids if i in held or i in fetched}

    def _get_commits(self, ids: list[str], max_workers: int) -> dict[str, ItemCommit]:
        """One GET per record, `max_workers` at once; each record is parsed as it arrives (no raw JSON kept)."""
        def read(item_id: str) -> ItemCommit | None:
            found = self.read_json(f"{COMMITS_DIR}/{item_id}.json")
            return None if found is None else ItemCommit.from_json(found)

        if not ids:
            return {}
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(ids)))) as pool:
            return {i: c for i, c in zip(ids, pool.map(read, ids)) if c is not None}

    def read_listed_commits(self, item_ids: Iterable[str] | None = None, listed: dict[str, str] | None = None,
                            snapshot: dict[str, tuple[str, str]] | None = None,
                            max_workers: int = COMMIT_READERS) -> tuple[dict[str, ItemCommit], int]:
        """(records, how many were fetched one by one) of `item_ids` that `_commits/` lists (default: all of
        them): each from the commit snapshot where it holds the listed version (`commit_snapshot`), else by GET.
        An id the listing lacks counts as not committed (as a resume has always taken the listing).
        `listed` / `snapshot`: a listing and snapshot already read (a caller going shard by shard)."""
        listed = commit_snapshot.listed_versions(self.storage, COMMITS_DIR) if listed is None else listed
        ids = [i for i in (listed if item_ids is None else item_ids) if i in listed]
        snapshot = commit_snapshot.read_snapshot(self.storage) if snapshot is None and ids else snapshot or {}
        held = commit_snapshot.from_snapshot(snapshot, listed, ids)
        fetched = self._get_commits([i for i in ids if i not in held], max_workers)
        return {i: held.get(i) or fetched[i] for i in ids if i in held or i in fetched}, len(ids) - len(held)

    def read_planned_commits(self) -> dict[str, ItemCommit]:
        """The commits of the items `_job.json` plans, in plan order."""
        return {i: c for shard in self.iter_planned_commits() for i, c in shard.items()}

    def prepare(self, fingerprint: dict[str, Any], fp_id: str, items: list[WorkItem],
                recorded_config: dict[str, Any], plan_key: str | None = None) -> dict[str, ItemCommit]:
        """Check the fingerprint, record the job (its plan as shards, written only when absent:
        `plan_store.write_plan`, `plan_key` the settings that cut it), drop orphans; returns the existing
        commits."""
        found_job = read_control(self.storage, JOB_FILE)
        job, job_etag = found_job if found_job is not None else (None, None)
        if record_epoch(job) > self.epoch:
            raise LockLost(f"{self.storage.url}: {JOB_FILE} was written by a newer lease (epoch {record_epoch(job)}) "
                           f"than this job's ({self.epoch}); this job stops")
        if job is not None and job.get("fingerprint_id") != fp_id:
            raise OutputError(
                f"{self.storage.url} holds output of a different job; refusing to mix vectors "
                f"({describe_difference(job.get('fingerprint', {}), fingerprint)}). "
                "Use a new output.path, or restore the original settings to resume."
            )
        listed = commit_snapshot.listed_versions(self.storage, COMMITS_DIR)
        commits, fetched = self.read_listed_commits(listed=listed)
        pieces = self._listed_pieces()
        broken = self.missing_files(commits.values(), pieces)
        for item_id in broken:  # committed again in this run: its record is replaced (`write_commit`)
            del commits[item_id]
        planned = {i.item_id for i in items}
        foreign = [c for c in commits.values() if c.fingerprint_id != fp_id]
        if foreign:
            raise OutputError(f"{self.storage.url}: {len(foreign)} commit(s) carry another fingerprint")
        stale = sorted(set(commits) - planned)
        if stale:
            raise OutputError(self._stale_message([commits[i] for i in stale], items))
        plan = plan_store.write_plan(self.storage, items, plan_key, self.epoch)
        success = self.storage.read_versioned(SUCCESS_FILE)
        fence(self.storage)
        failpoints.hit("before_job_write")
        write_control(self.storage, JOB_FILE, {
            "fingerprint": fingerprint, "fingerprint_id": fp_id, "config": recorded_config,
            "plan": plan, "updated_at": now(),
        }, self.epoch, expect=job_etag)
        if success is not None:  # only the version read: a newer run's _SUCCESS is another version
            delete_control(self.storage, SUCCESS_FILE, success[1])
        if fetched:  # the next resume reads these from the snapshot
            commit_snapshot.write_snapshot(self.storage, COMMITS_DIR, commits, listed)
        with self._snapshot_lock:
            self._known, self._unsnapshotted = dict(commits), 0
        self.remove_orphans(commits, planned, pieces)
        return commits

    def write_commit_snapshot(self, commits: dict[str, ItemCommit]) -> int:
        """At the end of a run (lock held): snapshot every record, so the next resume or `status` GETs none."""
        return commit_snapshot.write_snapshot(self.storage, COMMITS_DIR, commits)

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

    def read_rank_commits(self, names: Iterable[str] | None = None,
                          max_workers: int = COMMIT_READERS) -> dict[str, RankCommit]:
        """The rank commits listed under `_rank_commits/` (or those of `names`, read directly), by name."""
        names = list(self._names(RANK_COMMITS_DIR) if names is None else names)
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            found = pool.map(lambda n: self.read_json(f"{RANK_COMMITS_DIR}/{n}.json"), names)
        return {n: RankCommit.from_json(c) for n, c in sorted(zip(names, found)) if c is not None}

    def ranks_of(self, commits: dict[str, ItemCommit]) -> dict[str, RankCommit]:
        """The rank records ranked from exactly these score commits (records written before digests count too): a
        bucket ranked from other scores (a late writer's, or before new scores landed) is not part of the output."""
        digest = scores_digest(commits.values())
        return {n: r for n, r in self.read_rank_commits().items() if r.scores in (digest, None)}

    def drop_rank_commits(self) -> int:
        """Ranks depend on every score: new scores invalidate them (their files become orphans). Each record is
        deleted only as this writer read it (a newer writer's record of the same name is another version)."""
        found = [(rel, self.storage.read_versioned(rel)) for rel in self.storage.list_files(RANK_COMMITS_DIR)]
        fence(self.storage)
        return sum(delete_control(self.storage, rel, got[1]) for rel, got in found if got is not None)

    def write_rank_commit(self, record: RankCommit) -> RankCommit:
        """Create a bucket's rank record once (`If-None-Match: *`), stamped with this writer's epoch; one of an older
        epoch (a late writer's, or one ranked from other scores) is replaced with `If-Match` on what was read."""
        record = dataclasses.replace(record, epoch=self.epoch)
        rel = f"{RANK_COMMITS_DIR}/{record.name}.json"
        fence(self.storage)
        self._create_record(rel, _dumps(record.to_json()), record.epoch,
                            lambda held: RankCommit.from_json(held).scores != record.scores)
        return record

    def _create_record(self, rel: str, data: bytes, epoch: int, replaceable) -> dict[str, Any] | None:
        """Create a record once; if one is there: None if it is ours, raise `LockLost` if a newer lease wrote it,
        replace it (`If-Match`) if it is older and `replaceable(record)` says so, else return it (to adopt)."""
        for _ in range(10):
            try:
                self.storage.create(rel, data)
                return None
            except PreconditionFailed:
                pass
            found = self.storage.read_versioned(rel)
            if found is None:
                continue
            if found[0] == data:  # our create landed and a retry of it failed
                return None
            held = json.loads(found[0])
            if record_epoch(held) > epoch:
                raise LockLost(f"{self.storage.url}: {rel} was written by a newer lease (epoch {record_epoch(held)}, "
                               f"this job's is {epoch}); this job stops")
            if record_epoch(held) == epoch or not replaceable(held):
                return held
            try:
                self.storage.replace(rel, data, found[1])
                return None
            except PreconditionFailed:
                continue
        raise LockLost(f"{self.storage.url}: {rel} kept changing under this writer; another writer is active")

    def orphans(self, commits: Iterable[ItemCommit], grace_s: float = 0.0,
                planned: Collection[str] | None = None,
                listed: dict[str, float | None] | None = None) -> list[str]:
        """Piece files that no commit record names: neither one of `commits` (records as the store holds them: read
        from it, or returned by `write_commit`) nor any record in the store now.

        The store's records are read, not only listed: those a listing of `_commits/` shows that `commits` lacks,
        and, for each piece left, the record of its own item (`_commits/<item>.json`, from the piece's name) or
        rank bucket, read directly, so a listing that misses a record cannot doom its files. A piece whose item
        (or bucket) has a record that does not name it is an orphan whatever its age; one whose item has no record
        yet is kept while its item is one of the `planned` items (it is settled when the item commits), else is an
        orphan once older than `grace_s` (0: at once, as `embedrank verify` counts them). A file whose name carries
        a newer lease's epoch than this writer's is never an orphan to it. `listed`: the piece folders' listing
        with modification times, if the caller has it."""
        commits = list(commits)
        modified = self._listed_pieces() if listed is None else listed
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
        mine = self.epoch

        def dead(path: str) -> bool:
            if path in named or (mine and file_epoch(path) > mine):  # a newer lease's file: never ours to delete
                return False
            if owners[path] in recorded:  # its record exists and never names it: only a newer lease may replace
                return True  # that record, naming its own files, so nobody can commit this one any more
            owner = owners[path]
            if planned is not None and (owner is None or (owner[0] == COMMITS_DIR and owner[1] not in planned)):
                return True  # a piece of no planned item (or a name no writer makes): nobody will ever commit it
            if planned is not None and owner[0] == COMMITS_DIR:
                return False  # a planned item's piece: a late record may still name it; settled when it commits
            mtime = modified[path]
            return grace_s <= 0 or mtime is None or now - mtime >= grace_s

        return [p for p in left if dead(p)]

    def remove_orphans(self, commits: dict[str, ItemCommit], planned: Collection[str] | None = None,
                       listed: dict[str, float | None] | None = None) -> list[str]:
        """Delete piece files that no commit record names (`orphans`, with `orphan_grace_s`), and abort unfinished
        uploads.

        Only the lock holder calls this, before its graph starts or after it ends: no upload of its own is live."""
        orphans = self.orphans(commits.values(), self.orphan_grace_s, planned, listed)
        for start in range(0, len(orphans), 1000):  # fenced per batch: a lost lock stops the deletes
            fence(self.storage)
            failpoints.hit("before_orphan_delete")
            self.storage.delete(orphans[start:start + 1000], missing_ok=True)
        fence(self.storage)
        self.storage.abort_pending_uploads()
        return orphans

    def write_commit(self, record: ItemCommit) -> ItemCommit:
        """The commit point of an item: one atomic create-if-absent (`If-None-Match: *` on S3, an exclusive link
        of a complete temp file locally), stamped with this writer's lease epoch. Returns the record that is
        committed: if one for the same item and fingerprint exists already (a retried PUT, or a writer of an older
        epoch that was first), that one, as long as every file it names exists; one of an older epoch that names
        missing files is replaced (`If-Match` on the version read), never adopted; one of a newer epoch means this
        writer lost its lease (`LockLost`)."""
        failpoints.hit("before_commit_write")
        record = dataclasses.replace(record, epoch=self.epoch)
        rel = f"{COMMITS_DIR}/{record.item}.json"
        fence(self.storage)
        failpoints.hit("before_commit_create")

        def ours(held: dict[str, Any]) -> ItemCommit:
            existing = ItemCommit.from_json(held)
            if (existing.item, existing.fingerprint_id) != (record.item, record.fingerprint_id):
                raise OutputError(f"{self.storage.url}: {rel} was written by another writer with other contents; "
                                  "refusing to overwrite a commit record")
            return existing

        held = self._create_record(rel, _dumps(record.to_json()), record.epoch,
                                   lambda held: bool(self.missing_files([ours(held)])))
        if held is not None:
            record = self._adopted[record.item] = ours(held)
        failpoints.hit("after_commit_write")
        self._note_committed(record)
        return record

    def _note_committed(self, record: ItemCommit) -> None:
        """Count a new record; every `SNAPSHOT_EVERY` of them, rewrite the commit snapshot (best effort: a failed
        write costs the next resume GETs only, and a lost lock stops this writer at its next fence anyway)."""
        with self._snapshot_lock:
            self._known[record.item] = record
            self._unsnapshotted += 1
            if self._unsnapshotted < SNAPSHOT_EVERY:
                return
            self._unsnapshotted = 0
            known = dict(self._known)
        try:
            commit_snapshot.write_snapshot(self.storage, COMMITS_DIR, known)
        except (OSError, LockLost):
            pass

    def write_success(self, totals: Totals) -> None:
        """Close the run: `_SUCCESS` of this writer's epoch (a newer lease's one is never overwritten)."""
        fence(self.storage)
        write_control(self.storage, SUCCESS_FILE, {**totals.to_json(), "finished_at": now()}, self.epoch)

    def read_success(self) -> dict[str, Any] | None:
        """`_SUCCESS` if it closes the run `_job.json` records (same epoch), else None: a `_SUCCESS` written late
        by a writer that lost its lease, over a newer run's plan, does not say that run finished."""
        success = self.read_json(SUCCESS_FILE)
        if success is None:
            return None
        return success if record_epoch(success) == record_epoch(self.read_job_header()) else None
