"""The read side of an index root (`embedrank reindex`): its version folders and the pointer naming the current one.

Below both the output room and the reindex job: readers, `status`, `verify` and the table publication follow the
pointer without knowing how a reindex builds or publishes a version (`pipelines.reindex.index` writes it).
"""

from __future__ import annotations

import json
import re
from typing import Any

from common.errors import OutputError
from pipelines.storage import Storage

CURRENT_FILE = "_CURRENT.json"
_VERSION = re.compile(r"^v(\d{6})$")


def version_name(number: int) -> str:
    return f"v{number:06d}"


def version_number(name: str | None) -> int:
    if name is None:
        return 0
    match = _VERSION.match(name)
    if match is None:
        raise OutputError(f"{name!r} is not a version name (v000001, v000002, …)")
    return int(match.group(1))


def is_version(name: str) -> bool:
    return _VERSION.match(name) is not None


def parse_pointer(data: bytes | None) -> dict[str, Any] | None:
    """The pointer record, or None when it names no version (before the first publication, or only claimed)."""
    pointer = json.loads(data) if data else None
    return pointer if pointer and pointer.get("version") else None


def current_version(storage: Storage) -> str | None:
    """The version the index root's pointer names (None: none published, or not an index root)."""
    found = storage.read_versioned(CURRENT_FILE)
    pointer = parse_pointer(found[0] if found else None)
    return pointer["version"] if pointer else None


def version_folders(storage: Storage) -> list[str]:
    """The index root's version folders, in order (published, unpublished and discarded alike)."""
    return sorted(d for d in storage.list_dirs() if is_version(d))


def version_storage(storage: Storage, name: str) -> Storage:
    return Storage(f"{storage.url}/{name}", storage.storage_options)
