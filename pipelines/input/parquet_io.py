"""Parquet reads that tell a corrupt file from a failing store.

A file whose bytes are bad (truncated, not Parquet, a page that does not
decompress) is a fact about the data: a job may reject it and go on. A read
that fails in the store (network, throttling, permissions) says nothing about
the data and must never reject it. pyarrow reports both as OSError or
ArrowInvalid, so the file handle is wrapped: an error raised by the store is
re-raised as `StorageReadError`, and every other error is the file's.
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import InputError
from pipelines.storage import open_input


class StorageReadError(InputError):
    """The store failed while reading; the data may be fine. Never a reason to reject rows."""


class CorruptFile(Exception):
    """The file's own bytes cannot be decoded; `reason` is the reject code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _GuardedFile:
    """A read-only file whose I/O errors come out as StorageReadError (pyarrow re-raises them unchanged)."""

    def __init__(self, fh: Any, url: str):
        self._fh = fh
        self._url = url

    def _guard(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._fh, name)(*args)
        except Exception as exc:  # noqa: BLE001 - anything the store raises is the store's
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
        raise InputError(f"{url}: file vanished since it was listed") from None
    except OSError as exc:
        raise StorageReadError(f"{url}: cannot open ({type(exc).__name__}: {exc})") from exc


def read_metadata(url: str, storage_options: dict[str, Any]) -> pq.FileMetaData:
    """The file's footer; CorruptFile('unreadable_file') if it is not a readable Parquet file."""
    with _open(url, storage_options) as fh:
        try:
            return pq.ParquetFile(_GuardedFile(fh, url)).metadata
        except StorageReadError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptFile("unreadable_file", f"{url}: not a readable Parquet file ({exc})") from None


def read_row_groups(url: str, storage_options: dict[str, Any], groups: Sequence[int],
                    columns: list[str]) -> pa.Table:
    """Some row groups of a file; CorruptFile('unreadable_row_group') if their bytes do not decode."""
    with _open(url, storage_options) as fh:
        try:
            return pq.ParquetFile(_GuardedFile(fh, url)).read_row_groups(list(groups), columns=columns)
        except StorageReadError:
            raise
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            where = f"row groups {groups[0]}..{groups[-1]}" if groups else "no row groups"
            raise CorruptFile("unreadable_row_group", f"{url}: cannot decode {where} ({exc})") from None
