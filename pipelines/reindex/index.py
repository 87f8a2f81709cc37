"""An index root: numbered versions of an embedding output and one pointer naming the current version.

    ROOT/_CURRENT.json   {"version": "v000003", …}: replaced atomically, last; the commit point of a version,
                         as Iceberg swaps its metadata pointer. Readers open the version it names.
    ROOT/_lock.json      the one reindex or gc that may write (`pipelines.output.lock`)
    ROOT/v000001/ …      each an output root of the commit protocol (`pipelines.output.root`), plus `_reindex.json`
                         (its base version, fingerprint, snapshot plan digest, diff counts, the items it keeps by
                         content digest and where moved documents carry from) and `_digests.json` (each item's
                         content digest, which the next version matches its items against)

A version's commit records may name files of older versions (`../v000001/data/…`): a work item whose
input bytes and job fingerprint are unchanged, or whose content digest equals a committed item's (a
re-exported or renamed file), keeps those committed files by reference, so an unchanged shard costs one
small JSON write. `gc` therefore deletes only files that no kept version names.
Version numbers are never reused: a new attempt is numbered after every version folder there is, and an
unpublished attempt that no longer matches the snapshot is discarded by a tombstone (its `_reindex.json`
rewritten as discarded, with the store's compare-and-swap) before its files are deleted. So no writer ever
writes into a folder another writer may be deleting, and a late delete of a discarded attempt is harmless.

Fencing (`pipelines.output.control`): a writer first claims the pointer (rewrites it with its lease epoch,
`If-Match`), so a publish by a writer that lost its lease fails its `If-Match`; a version is published only
with a `_SUCCESS` of the publishing writer's epoch; attempt states are written only over older epochs.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
from collections.abc import Callable
from typing import Any, TextIO

from common import failpoints
from common.errors import OutputError
from pipelines.output.control import read_control, record_epoch, write_control
from pipelines.output.index_pointer import (  # noqa: F401  (CURRENT_FILE, version_name: this module's API too)
    CURRENT_FILE,
    parse_pointer,
    version_folders,
    version_name,
    version_number,
    version_storage,
)
from pipelines.output.lock import fence, held_epoch
from pipelines.output.root import OutputRoot
from pipelines.storage import PreconditionFailed, Storage

REINDEX_FILE = "_reindex.json"
DIGESTS_FILE = "_digests.json"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def rebase(path: str, from_version: str, to_version: str) -> str:
    """A path relative to one version's root, made relative to another's (both under the same index root)."""
    absolute = posixpath.normpath(posixpath.join("/", from_version, path))
    return posixpath.relpath(absolute, posixpath.join("/", to_version))


class IndexRoot:
    """Reads and writes the versions and the pointer of one index root."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._json = OutputRoot(storage).read_json
        self._pointer_seen: tuple[str | None] | None = None
        """The pointer's version token as this object first read it (None inside: absent); `publish` swaps the
        pointer only if it is still that one (`If-Match`), i.e. the base this run built its version from."""

    @property
    def epoch(self) -> int:
        """The lease epoch this process holds on the index (0 without a lock)."""
        return held_epoch(self.storage)

    def current(self) -> dict[str, Any] | None:
        """The pointer record, or None before the first version is published."""
        found = self.storage.read_versioned(CURRENT_FILE)
        if self._pointer_seen is None:
            self._pointer_seen = (found[1] if found else None,)
        return parse_pointer(found[0] if found else None)

    def claim(self) -> None:
        """Stamp the pointer with this writer's lease epoch (`If-Match` on the version read; before the first
        version, a pointer that names none), before this writer discards, builds, publishes or collects anything:
        from then on a publish by a writer that lost its lease fails its `If-Match`, whenever it comes."""
        found = read_control(self.storage, CURRENT_FILE)
        record = {k: v for k, v in (found[0] if found else {"version": None}).items() if k != "epoch"}
        etag = write_control(self.storage, CURRENT_FILE, record, self.epoch, expect=found[1] if found else None)
        self._pointer_seen = (etag,)

    def versions(self) -> list[str]:
        return version_folders(self.storage)

    def version_url(self, name: str) -> str:
        return f"{self.storage.url}/{name}"

    def version_root(self, name: str) -> OutputRoot:
        return OutputRoot(version_storage(self.storage, name))

    def attempt_state(self, name: str) -> dict[str, Any] | None:
        """Version `name`'s attempt state (without the epoch of its last writer)."""
        found = self._json(f"{name}/{REINDEX_FILE}")
        return None if found is None else {k: v for k, v in found.items() if k != "epoch"}

    def write_attempt_state(self, name: str, state: dict[str, Any]) -> None:
        """Write a version's attempt state, stamped with this writer's epoch; never over a newer lease's, nor over
        a discarded attempt's (`LockLost`: a newer writer discarded it)."""
        fence(self.storage)
        rel = f"{name}/{REINDEX_FILE}"
        found = read_control(self.storage, rel)
        if found is not None and found[0].get("discarded"):
            from common.errors import LockLost

            raise LockLost(f"{self.storage.url}: {name} was discarded (epoch {record_epoch(found[0])}); this writer "
                           "no longer owns it")
        write_control(self.storage, rel, {k: v for k, v in state.items() if k != "epoch"}, self.epoch,
                      expect=found[1] if found else None)

    def digests(self, name: str | None) -> dict[str, str] | None:
        """Item id → content digest of version `name`'s items (None: not recorded, a version built before them)."""
        found = self._json(f"{name}/{DIGESTS_FILE}") if name else None
        return None if found is None else {k: v for k, v in found.get("digests", {}).items() if v}

    def write_digests(self, name: str, digests: dict[str, str | None]) -> None:
        fence(self.storage)
        data = {"format": 1, "digests": {k: v for k, v in sorted(digests.items()) if v}}
        self.storage.write_bytes(f"{name}/{DIGESTS_FILE}", json.dumps(data, separators=(",", ":")).encode())

    def discard(self, name: str) -> int:
        """Tombstone an unpublished version (its attempt state rewritten as discarded, `If-Match`), then delete its
        other files; returns how many. Its number is never used again, so no writer creates a file there after the
        tombstone, and a late delete of these files is harmless."""
        if name == (self.current() or {}).get("version"):
            raise OutputError(f"refusing to discard {name}: it is the current version")
        rel = f"{name}/{REINDEX_FILE}"
        fence(self.storage)
        found = read_control(self.storage, rel)
        if found is None or not found[0].get("discarded"):
            state = {k: v for k, v in (found[0] if found else {}).items() if k != "epoch"}
            write_control(self.storage, rel, {**state, "discarded": True, "discarded_at": _now()}, self.epoch,
                          expect=found[1] if found else None)
        files = [f for f in self.storage.list_files(name) if f != rel]
        fence(self.storage)
        failpoints.hit("before_discard_delete")
        self.storage.delete(files, missing_ok=True)
        self.storage.remove_empty_folders(name)
        return len(files)

    def is_discarded(self, name: str) -> bool:
        return bool((self.attempt_state(name) or {}).get("discarded"))

    def start_attempt(self, base: str | None, state: dict[str, Any], stream: TextIO) -> tuple[str, dict[str, Any]]:
        """The version this run builds: an unpublished version after `base` resumed if it was started from the same
        base, settings and snapshot (`state`'s keys), claimed with this writer's epoch; else a fresh one, numbered
        after every version folder there is. Other unpublished versions are discarded."""
        names = self.versions()
        resumed: tuple[str, dict[str, Any]] | None = None
        for name in names:
            if version_number(name) <= version_number(base):
                continue
            found = self.attempt_state(name)
            if found is not None and found.get("discarded"):
                continue
            if resumed is None and found is not None and all(found.get(k) == v for k, v in state.items()):
                self.write_attempt_state(name, found)  # the claim: a writer that lost its lease cannot discard it
                resumed = name, found
                continue
            removed = self.discard(name)
            print(f"reindex: discarding unpublished {name} ({removed} file(s)): it was started from another "
                  "snapshot, base or settings", file=stream, flush=True)
        if resumed is not None:
            return resumed
        target = version_name(max([version_number(base), *map(version_number, names)]) + 1)
        fresh = {**state, "started_at": _now()}
        self.write_attempt_state(target, fresh)
        return target, fresh

    def publish(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        """Make `name` current: one atomic write of the pointer. Before it, readers see the previous version. Only
        the writer whose run finished the version publishes it (its `_SUCCESS` carries this writer's epoch), and
        only over the pointer it read or claimed (`If-Match`)."""
        success = self.version_root(name).read_success()
        if success is None or record_epoch(success) != self.epoch:
            raise OutputError(f"refusing to publish {name}: it has no _SUCCESS of this run (not every item is "
                              "committed by this writer)")
        state = self.attempt_state(name) or {}
        self.write_attempt_state(name, {**state, "finished_at": _now()})
        pointer = {**record, "version": name, "published_at": _now()}
        if self._pointer_seen is None:
            self.current()
        (seen,) = self._pointer_seen or (None,)
        fence(self.storage)
        failpoints.hit("before_pointer_write")
        data = json.dumps({**pointer, "epoch": self.epoch}, indent=1, sort_keys=True).encode()
        try:  # the swap: If-Match on the pointer this run read (If-None-Match: * for the first version)
            etag = self.storage.create(CURRENT_FILE, data) if seen is None else self.storage.replace(
                CURRENT_FILE, data, seen)
        except PreconditionFailed:
            found = self.storage.read_versioned(CURRENT_FILE)
            if found is None or found[0] != data:  # else: our PUT landed and a retry of it failed
                held = json.loads(found[0]) if found else {}
                raise OutputError(f"refusing to publish {name}: {CURRENT_FILE} changed since this run read it "
                                  f"(now {held.get('version') or 'none'}, written by lease epoch "
                                  f"{record_epoch(held)}; this run's is {self.epoch}); another writer owns the "
                                  "index now") from None
            etag = found[1]
        self._pointer_seen = (etag,)
        return pointer

    def named_files(self, name: str) -> set[str]:
        """Every file (relative to the index root) that the commits of version `name` name."""
        commits = self.version_root(name).read_planned_commits()
        return {posixpath.normpath(posixpath.join(name, path)) for c in commits.values() for path in c.named_paths}

    def describe(self) -> list[dict[str, Any]]:
        """One row per version: its state (current, previous, unpublished, collected), rows and diff counts."""
        current = version_number((self.current() or {}).get("version"))
        rows = []
        for name in self.versions():
            n = version_number(name)
            root = self.version_root(name)
            success = root.read_success()
            attempt = self.attempt_state(name) or {}
            if attempt.get("discarded"):
                state = "discarded (an attempt of another snapshot; its number is not reused)"
            elif n == current:
                state = "current"
            elif n > current:
                state = "unpublished (in progress, or resumable by rerunning reindex)"
            elif root.read_job() is None:
                state = "collected (only files newer versions still name are left)"
            else:
                state = "previous"
            rows.append({"version": name, "state": state, "base": attempt.get("base"),
                         "rows": (success or {}).get("rows"), "counts": attempt.get("counts"),
                         "finished_at": attempt.get("finished_at")})
        return rows

    def gc(self, keep: int, stream: TextIO,
           before_delete: Callable[[list[str]], Any] | None = None) -> dict[str, Any]:
        """Delete the versions older than the `keep` newest published ones, except files a kept version names.

        Unpublished versions newer than the current one are kept (a rerun resumes them). `before_delete(dropped)`
        runs before any file is deleted (the Iceberg table's snapshots of those versions are expired there)."""
        if keep < 1:
            raise OutputError("gc --keep must be at least 1 (the current version is always kept)")
        self.claim()
        current_name = (self.current() or {}).get("version")
        current = version_number(current_name)
        if current == 0:
            raise OutputError(f"{self.storage.url}: no version is published ({CURRENT_FILE} is missing); nothing to gc")
        cur = self.version_root(current_name)
        if cur.read_job_header() is None or cur.read_success() is None:
            raise OutputError(f"{self.storage.url}: refusing to gc: the current version {current_name} cannot be read "
                              "(its _job.json or _SUCCESS is missing); nothing was deleted. Rerun reindex to publish "
                              "a new version first")
        names = self.versions()
        kept = [v for v in names if current - keep < version_number(v)]
        dropped = [v for v in names if version_number(v) <= current - keep]
        named: set[str] = set()
        for v in kept:
            named |= self.named_files(v)
        if dropped and before_delete is not None:
            before_delete(dropped)
        deleted = 0
        for v in dropped:
            files = self.storage.list_files(v)
            doomed = [f for f in files if f not in named]
            fence(self.storage)
            failpoints.hit("before_gc_delete")
            self.storage.delete(doomed, missing_ok=True)
            self.storage.remove_empty_folders(v)
            deleted += len(doomed)
            print(f"gc: {v}: deleted {len(doomed)} file(s)", file=stream, flush=True)
        return {"kept": kept, "collected": dropped, "files_deleted": deleted}
