"""Parquet reads that tell a corrupt file from a failing store.

A file whose bytes are bad (truncated, not Parquet, a page that does not
decompress) is a fact about the data: a job may reject it and go on. A read
that fails in the store (network, throttling, permissions) says nothing about
the data and must never reject it. pyarrow reports both as OSError or
ArrowInvalid, so the file handle is wrapped: an error raised by the store is
re-raised as `StorageReadError`, and every other error is the file's.

A third case is neither: the file is no longer the version the plan recorded
(rewritten, truncated, replaced while being read). Every input read, Parquet or
JSONL, goes through `open_pinned`, which checks the file against the item's `Pin`
when it opens it and again when the read is done (or fails), and raises
`InputChanged`: the job stops naming the file, and no row is rejected for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import InputChanged, InputError
from common.object_version import object_version
from pipelines.storage import changed_while_reading, input_info, open_input


class StorageReadError(InputError):
    """The store failed while reading; the data may be fine. Never a reason to reject rows."""


class CorruptFile(Exception):
    """The file's own bytes cannot be decoded; `reason` is the reject code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Pin:
    """A file's identity as the plan listed it: its size and version tag (`object_version`: S3 ETag, local mtime)."""

    size: int
    version: str

    def check(self, url: str, info: dict[str, Any]) -> None:
        """Raise `InputChanged` unless `info` (what the store says now) describes the pinned version."""
        size, version = int(info.get("size") or 0), object_version(info)
        if (size, version) != (self.size, self.version):
            raise InputChanged(changed_message(url, f"planned: {self.size} bytes, version {self.version}; "
                                                    f"now: {size} bytes, version {version}"))

    def check_now(self, url: str, storage_options: dict[str, Any]) -> None:
        try:
            info = input_info(url, storage_options)
        except FileNotFoundError:
            raise InputChanged(changed_message(url, "it no longer exists")) from None
        except Exception as exc:  # noqa: BLE001 - anything the store raises is the store's
            raise StorageReadError(f"{url}: cannot stat ({type(exc).__name__}: {exc})") from exc
        self.check(url, info)


def changed_message(url: str, detail: str) -> str:
    return (f"{url} changed since the job was planned ({detail}); its rows are not read under the old plan. "
            "Rerun the command to plan again (an output that committed items of the old version then refuses "
            "the change: take changed inputs in with `embedrank reindex`, or use a new output.path)")


class _GuardedFile:
    """A read-only file whose I/O errors come out as StorageReadError (pyarrow re-raises them unchanged)."""

    def __init__(self, fh: Any, url: str):
        self._fh = fh
        self._url = url

    def _guard(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._fh, name)(*args)
        except Exception as exc:  # noqa: BLE001 - anything the store raises is the store's
            if changed_while_reading(exc):
                raise InputChanged(changed_message(self._url, "it was replaced while being read")) from exc
            raise StorageReadError(f"{self._url}: read failed in the store ({type(exc).__name__}: {exc})") from exc

    def read(self, *args: Any) -> bytes:
        return self._guard("read", *args)

    def readinto(self, *args: Any) -> int:
        return self._guard("readinto", *args)

    def seek(self, *args: Any) -> int:
        return self._guard("seek", *args)

    def tell(self) -> int:
        return self._guard("tell")

    def __getattr__(self, name: str) -> Any:
        if name == "read_buffer":  # pyarrow prefers it when present; keep every read on the guarded path
            raise AttributeError(name)
        return getattr(self._fh, name)


def _open(url: str, storage_options: dict[str, Any]):
    try:
        return open_input(url, storage_options)
    except PermissionError as exc:
        raise InputError(f"{url}: access denied ({exc})") from None
    except FileNotFoundError:
        raise InputChanged(changed_message(url, "it no longer exists")) from None
    except OSError as exc:
        raise StorageReadError(f"{url}: cannot open ({type(exc).__name__}: {exc})") from exc


def _opened_info(fh: Any, url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """What the opened file says it is: s3fs's `details` (the ETag its range GETs send as `If-Match`), else a stat."""
    details = getattr(fh, "details", None)
    return details if isinstance(details, dict) and "size" in details else input_info(url, storage_options)


@contextmanager
def open_pinned(url: str, storage_options: dict[str, Any], pin: Pin | None) -> Iterator[_GuardedFile]:
    """`url` opened for reading, checked against `pin` (None: unchecked) when opened and when the read is done.

    A read that fails (a decode error included) while the file no longer matches raises `InputChanged` instead:
    bytes of another version are never taken for a corrupt file. Store errors come out as `StorageReadError`."""
    with _open(url, storage_options) as fh:
        if pin is not None:
            try:
                opened = _opened_info(fh, url, storage_options)
            except FileNotFoundError:
                raise InputChanged(changed_message(url, "it no longer exists")) from None
            except Exception as exc:  # noqa: BLE001 - anything the store raises is the store's
                raise StorageReadError(f"{url}: cannot stat ({type(exc).__name__}: {exc})") from exc
            pin.check(url, opened)
        try:
            yield _GuardedFile(fh, url)
        except InputChanged:
            raise
        except Exception:
            if pin is not None:
                try:
                    pin.check_now(url, storage_options)
                except StorageReadError:
                    pass  # the store cannot tell: the read's own error stands
            raise
    if pin is not None:
        pin.check_now(url, storage_options)


def read_metadata(url: str, storage_options: dict[str, Any], pin: Pin | None = None) -> pq.FileMetaData:
    """The file's footer; CorruptFile('unreadable_file') if it is not a readable Parquet file, InputChanged if
    it is not the version `pin` names."""
    with open_pinned(url, storage_options, pin) as fh:
        try:
            return pq.ParquetFile(fh).metadata
        except (StorageReadError, InputChanged):
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptFile("unreadable_file", f"{url}: not a readable Parquet file ({exc})") from None


def read_row_groups(url: str, storage_options: dict[str, Any], groups: Sequence[int],
                    columns: list[str], pin: Pin | None = None) -> pa.Table:
    """Some row groups of a file; CorruptFile('unreadable_row_group') if their bytes do not decode, InputChanged
    if the file is not the version `pin` names."""
    with open_pinned(url, storage_options, pin) as fh:
        try:
            return pq.ParquetFile(fh).read_row_groups(list(groups), columns=columns)
        except (StorageReadError, InputChanged):
            raise
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            where = f"row groups {groups[0]}..{groups[-1]}" if groups else "no row groups"
            raise CorruptFile("unreadable_row_group", f"{url}: cannot decode {where} ({exc})") from None
