"""Object storage I/O: the one module that talks to fsspec (local disk, S3, any fsspec store).

A `Storage` is a root URL plus options; it is cheap to pickle (the filesystem is
rebuilt lazily in each process) so Ray tasks can carry it.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

GLOB_CHARS = "*?["


def _protocol_prefix(fs: fsspec.AbstractFileSystem, url: str) -> str:
    """`s3://` for `s3://b/x/*.parquet`: glob results come back without it; local paths need none."""
    if isinstance(fs, LocalFileSystem) or "://" not in url:
        return ""
    return url.split("://", 1)[0] + "://"


class Storage:
    """A directory-like root on any fsspec filesystem, addressed by paths relative to the root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.storage_options = dict(storage_options or {})
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])

    def _connect(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        if isinstance(fs, LocalFileSystem):
            root = os.path.abspath(root)
        self._fs, self._root = fs, root.rstrip("/")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._connect()
        return self._fs  # type: ignore[return-value]

    @property
    def root(self) -> str:
        if self._root is None:
            self._connect()
        return self._root  # type: ignore[return-value]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        """The full path of `rel`; `..` segments are resolved (an index version names files of older versions as
        `../v000001/data/…`, and object stores do not resolve `..` themselves)."""
        return posixpath.normpath(posixpath.join(self.root, rel)) if rel else self.root

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one object atomically: readers see the old state or the whole new object, never a part."""
        target = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def list_files(self, rel_dir: str) -> list[str]:
        """Every file under `rel_dir`, as sorted paths relative to the root ([] if absent)."""
        base = self.path(rel_dir)
        self.fs.invalidate_cache(base)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        rels = (posixpath.relpath(self.fs._strip_protocol(p), self.root) for p in found)
        return sorted(r for r in rels if r != posixpath.normpath(rel_dir or "."))  # not a store's folder marker

    def list_dirs(self, rel_dir: str = "") -> list[str]:
        """Names of the folders directly under `rel_dir` (one listing call, not a recursive walk)."""
        base = self.path(rel_dir)
        self.fs.invalidate_cache(base)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")

    def pending_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of multipart uploads begun under the root and never completed (S3; [] elsewhere).

        A writer killed mid-upload leaves one behind: invisible to listings, but stored and billed."""
        call = getattr(self.fs, "call_s3", None)
        if call is None:
            return []
        bucket, _, prefix = self.root.partition("/")
        listing = call("list_multipart_uploads", Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        return [(u["Key"], u["UploadId"]) for u in listing.get("Uploads", [])]

    def abort_pending_uploads(self, max_rounds: int = 100) -> int:
        """Abort every pending upload under the root; listing again until none is left (no paging needed)."""
        bucket = self.root.partition("/")[0]
        aborted = 0
        for _ in range(max_rounds):
            try:
                pending = self.pending_uploads()
            except PermissionError:  # no s3:ListBucketMultipartUploads: a lifecycle rule must clean up
                return aborted
            if not pending:
                break
            for key, upload_id in pending:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            aborted += len(pending)
        return aborted

    def delete_tree(self, rel_dir: str) -> None:
        """Remove a folder and whatever is left under it (an empty folder, or a store's folder marker)."""
        try:
            self.fs.rm(self.path(rel_dir), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def delete(self, rels: list[str]) -> None:
        if rels:
            self.fs.rm([self.path(r) for r in rels])
        self.fs.invalidate_cache()


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input shard: its full URL, its path relative to its glob's base, and a version tag."""

    url: str
    rel: str
    size: int
    version: str


def _static_prefix(pattern: str) -> str:
    cut = min((pattern.find(c) for c in GLOB_CHARS if c in pattern), default=len(pattern))
    return pattern[:cut].rsplit("/", 1)[0] if "/" in pattern[:cut] else ""


def _version_of(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return str(mtime.timestamp() if hasattr(mtime, "timestamp") else mtime)


def expand_inputs(patterns: list[str], extension: str, storage_options: dict[str, Any]) -> list[InputFile]:
    """Resolve globs (or directories) to a sorted, de-duplicated list of files; an empty match is an error."""
    from common.errors import InputError

    files: dict[str, InputFile] = {}
    for pattern in patterns:
        fs, stripped = fsspec.core.url_to_fs(pattern, **storage_options)
        proto = _protocol_prefix(fs, pattern)
        if isinstance(fs, LocalFileSystem):
            stripped = os.path.abspath(stripped)
        if not any(c in stripped for c in GLOB_CHARS) and fs.isdir(stripped):
            base, glob = stripped.rstrip("/"), stripped.rstrip("/") + f"/**/*{extension}"
        else:
            base, glob = _static_prefix(stripped), stripped
        try:
            matches = fs.glob(glob, detail=True)
        except PermissionError as exc:
            raise InputError(f"input.paths: access denied listing {pattern!r} ({exc})") from None
        found = {p: info for p, info in matches.items() if info.get("type", "file") == "file"}
        if not found:
            raise InputError(f"input.paths: {pattern!r} matches no file")
        for p, info in found.items():
            url = proto + p
            if url not in files:
                rel = posixpath.relpath(p, base) if base else p
                files[url] = InputFile(url=url, rel=rel, size=int(info.get("size") or 0), version=_version_of(info))
    return [files[k] for k in sorted(files)]


def open_input(url: str, storage_options: dict[str, Any]):
    """Open one input file for binary reading."""
    return fsspec.open(url, "rb", **storage_options).open()
