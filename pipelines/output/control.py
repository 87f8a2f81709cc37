"""What the store enforces for every mutation of an output: lease epochs in file names and in control files.

A lock holder's check of its lease before a write is an early exit, not a fence: a driver can pause between
the check and the write (a VM suspend, a long GC pause, a partition) and wake after another driver took the
output over. So every mutation is shaped so that the store itself refuses it, or it is harmless, when it
comes late:

- Files a holder creates carry its epoch in their names (`epoch_tag`): no two holders ever write the same
  path, so a late write never overwrites, and a late delete of "its own older" files never removes, what a
  newer holder wrote. A retry of one holder still writes the same name (idempotent).
- Control files (`_job.json`, `_SUCCESS`, rank records, an index's `_CURRENT.json` and attempt states)
  carry the epoch of their last writer and are only ever written by `write_control`: a create with
  `If-None-Match: *`, or a replace with `If-Match` on the version this writer read, and only while what it
  read is of its own epoch or older. A late writer either fails its precondition (a newer holder wrote
  since) or reads a newer epoch and stops (`LockLost`).
- Deletes of control files are conditional on the version read (`delete_if_match`); deletes of data files
  touch only listed files of older epochs (or of this holder's own) that no record names.
"""

from __future__ import annotations

import json
import re
from typing import Any

from common.errors import LockLost
from pipelines.storage import PreconditionFailed, Storage

EPOCH_KEY = "epoch"
_EPOCH_IN_NAME = re.compile(r"-e(\d+)-[0-9a-f]{12}\.parquet$")


def epoch_tag(epoch: int) -> str:
    """The part of a file name that says which lease wrote it."""
    return f"e{epoch}"


def file_epoch(path: str) -> int:
    """The epoch a file's name carries; 0 for names written before epochs (older than every lease)."""
    found = _EPOCH_IN_NAME.search(path)
    return int(found.group(1)) if found else 0


def record_epoch(record: dict[str, Any] | None) -> int:
    return int((record or {}).get(EPOCH_KEY) or 0)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def read_control(storage: Storage, rel: str) -> tuple[dict[str, Any], str] | None:
    """A control file's record and version token (None if absent)."""
    found = storage.read_versioned(rel)
    return None if found is None else (json.loads(found[0]), found[1])


def write_control(storage: Storage, rel: str, record: dict[str, Any], epoch: int, *,
                  expect: str | None = None, attempts: int = 10) -> str:
    """Write `record` (stamped with `epoch`) to `rel` so that the store refuses it if a newer holder got there
    first; returns the new version token.

    `expect`: the version token this writer last read (a replace only from that one: `If-Match`); None: read now
    and replace whatever is there if it is of this epoch or older, or create it if absent (`If-None-Match: *`).
    Raises `LockLost` when what is stored carries a newer epoch: this writer's lease is over."""
    data = _dumps({**record, EPOCH_KEY: epoch})
    for _ in range(attempts):
        if expect is None:
            found = read_control(storage, rel)
            if found is not None:
                held, expect = found
                if record_epoch(held) > epoch:
                    raise LockLost(f"{storage.url}: {rel} was written by a newer lease (epoch {record_epoch(held)}, "
                                   f"this writer's is {epoch}); this writer stops")
        try:
            if expect is None:
                return storage.create(rel, data)
            return storage.replace(rel, data, expect)
        except PreconditionFailed:
            landed = storage.read_versioned(rel)
            if landed is not None and landed[0] == data:  # our PUT landed and a retry of it failed
                return landed[1]
            expect = None  # read again: a newer epoch stops us, an older one (a late writer) is replaced
    raise LockLost(f"{storage.url}: {rel} kept changing under this writer; another writer is active")


def delete_control(storage: Storage, rel: str, etag: str) -> bool:
    """Delete a control file only if it is still the version this writer read (False if it changed or is gone)."""
    return storage.delete_if_match(rel, etag)
