"""Object storage I/O: the one module that talks to fsspec (local disk, S3, any fsspec store).

A `Storage` is a root URL plus options; it is cheap to pickle (the filesystem is
rebuilt lazily in each process) so Ray tasks can carry it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from common.object_version import object_version

GLOB_CHARS = "*?["


def _protocol_prefix(fs: fsspec.AbstractFileSystem, url: str) -> str:
    """`s3://` for `s3://b/x/*.parquet`: glob results come back without it; local paths need none."""
    if isinstance(fs, LocalFileSystem) or "://" not in url:
        return ""
    return url.split("://", 1)[0] + "://"


class PreconditionFailed(Exception):
    """A conditional write or delete found the object other than expected: present for a create, absent or
    changed (another ETag) for a compare-and-swap. S3's 412 (and 409 ConditionalRequestConflict) map to it."""


def _is_precondition_failure(exc: BaseException) -> bool:
    """Whether an s3fs/botocore error is a failed `If-None-Match` / `If-Match` (412, or 409 on a concurrent one)."""
    if isinstance(exc, FileExistsError):  # s3fs's own translation of a failed If-None-Match
        return True
    for err in (exc, exc.__cause__, exc.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status in (409, 412):
                return True
    return "pre-conditions you specified did not hold" in str(exc) or "PreconditionFailed" in str(exc)


def content_etag(data: bytes) -> str:
    """The version token of local (and emulated) conditional writes: the content's SHA-256."""
    return hashlib.sha256(data).hexdigest()


class Storage:
    """A directory-like root on any fsspec filesystem, addressed by paths relative to the root.

    Besides plain atomic writes (`write_bytes`, for pieces), the control files use conditional ones:
    `create` (fails if the object exists), `replace` and `delete_if_match` (compare-and-swap on the version
    token that `read_versioned` returned). On S3 they are `If-None-Match: *` / `If-Match: <ETag>` requests,
    enforced by the store (`conditional_write_problem` probes that it does); on local disk an `O_EXCL`-like
    hard link of a complete temp file, and a content-hash check plus atomic rename under an `flock` of the
    folder. Other fsspec stores get an emulation (read, compare, write) that is not atomic.
    """

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
            os.replace(self._local_temp(target, data), target)
        else:
            self.fs.pipe_file(target, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    # -- conditional writes (control files: the lock, commit records, the index pointer) ----------------------

    @property
    def is_s3(self) -> bool:
        return not self.is_local and hasattr(self.fs, "call_s3")

    def describe(self) -> str:
        """The root URL, with the endpoint when one is configured (names the store in messages)."""
        endpoint = self.storage_options.get("endpoint_url") or (
            self.storage_options.get("client_kwargs") or {}).get("endpoint_url")
        return f"{self.url} (endpoint {endpoint})" if endpoint else self.url

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.path(rel).partition("/")
        return bucket, key

    def _s3_put(self, rel: str, data: bytes, conditions: dict[str, str]) -> str:
        """One PUT with `conditions` (IfNoneMatch / IfMatch); returns the new ETag."""
        bucket, key = self._bucket_key(rel)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **conditions)
        except FileNotFoundError:
            if "IfMatch" in conditions:  # AWS answers If-Match on a missing key with 404
                raise PreconditionFailed(f"{self.path(rel)} does not exist") from None
            raise
        except OSError as exc:
            if _is_precondition_failure(exc):
                raise PreconditionFailed(f"{self.path(rel)}: {exc}") from None
            raise
        finally:
            self.fs.invalidate_cache(self.path(rel))
        etag = out.get("ETag") if isinstance(out, dict) else None
        return etag or self.fs.info(self.path(rel))["ETag"]

    @contextmanager
    def _folder_lock(self, target: str, timeout_s: float = 10.0) -> Iterator[None]:
        """Serialise local compare-and-swaps in one folder (an `flock` of the folder itself: no sidecar file).

        The section is a read, a compare and a rename. A process stopped inside it (SIGSTOP) would block the
        others, so they give up after `timeout_s` with `PreconditionFailed`: refusing is the safe answer."""
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise PreconditionFailed(f"{folder}: another process holds its lock") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _local_temp(self, target: str, data: bytes) -> str:
        """`data` synced to a new temp file beside `target`, ready to be renamed or linked into place."""
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """The object's bytes and version token (S3: the ETag of that very GET), None if it does not exist."""
        if self.is_s3:
            from fsspec.asyn import sync

            bucket, key = self._bucket_key(rel)

            async def get() -> tuple[bytes, str]:
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
                try:
                    body = await resp["Body"].read()
                finally:
                    resp["Body"].close()
                return body, resp["ETag"]

            try:  # retried as s3fs retries its own reads (a reset while the body streams included)
                from s3fs.core import _error_wrapper
            except ImportError:  # pragma: no cover - a private helper of s3fs
                _error_wrapper = None
            try:
                if _error_wrapper is None:
                    return sync(self.fs.loop, get)
                return sync(self.fs.loop, _error_wrapper, get, retries=self.fs.retries)
            except FileNotFoundError:
                return None
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            return None
        return data, content_etag(data)

    def create(self, rel: str, data: bytes) -> str:
        """Write `rel` only if it does not exist (`If-None-Match: *`); returns its version token.

        Raises `PreconditionFailed` if it exists. Readers never see a partial object."""
        if self.is_s3:
            return self._s3_put(rel, data, {"IfNoneMatch": "*"})
        target = self.path(rel)
        if self.is_local:
            tmp = self._local_temp(target, data)
            try:
                os.link(tmp, target)  # atomic, and fails if the name exists (as O_EXCL does)
            except FileExistsError:
                raise PreconditionFailed(f"{target} exists") from None
            finally:
                os.unlink(tmp)
            return content_etag(data)
        if self.exists(rel):  # emulation: not atomic (see conditional_write_problem)
            raise PreconditionFailed(f"{target} exists")
        self.write_bytes(rel, data)
        return content_etag(data)

    def replace(self, rel: str, data: bytes, etag: str) -> str:
        """Overwrite `rel` only if its version token is still `etag` (`If-Match`); returns the new token.

        Raises `PreconditionFailed` if it changed or is gone."""
        if self.is_s3:
            return self._s3_put(rel, data, {"IfMatch": etag})
        target = self.path(rel)
        if self.is_local:
            tmp = self._local_temp(target, data)  # written (and synced) before the locked section
            try:
                with self._folder_lock(target):
                    self._check_local(rel, etag)
                    os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            return content_etag(data)
        self._check_local(rel, etag)
        self.write_bytes(rel, data)
        return content_etag(data)

    def _check_local(self, rel: str, etag: str) -> None:
        found = self.read_versioned(rel)
        if found is None:
            raise PreconditionFailed(f"{self.path(rel)} does not exist")
        if found[1] != etag:
            raise PreconditionFailed(f"{self.path(rel)} changed (version {found[1][:12]}, expected {etag[:12]})")

    def delete_if_match(self, rel: str, etag: str) -> bool:
        """Delete `rel` only if its version token is still `etag`; False (nothing deleted) if it changed or is gone."""
        if self.is_s3:
            bucket, key = self._bucket_key(rel)
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
                return True
            except FileNotFoundError:
                return False
            except OSError as exc:
                if _is_precondition_failure(exc):
                    return False
                # a store without conditional deletes: compare, then delete (a small window, at release only)
                found = self.read_versioned(rel)
                if found is None or found[1] != etag:
                    return False
                self.delete([rel])
                return True
            finally:
                self.fs.invalidate_cache(self.path(rel))
        target = self.path(rel)
        try:
            if self.is_local:
                with self._folder_lock(target):
                    self._check_local(rel, etag)
                    os.unlink(target)
                return True
            self._check_local(rel, etag)
        except PreconditionFailed:
            return False
        self.delete([rel])
        return True

    def conditional_write_problem(self) -> str | None:
        """None if this store enforces conditional writes, else what is wrong (a probe: two creates of one
        object, where the second must fail; a write with a wrong If-Match, which must fail; one with the right
        one, which must succeed). Local disk needs no probe. The probe object is deleted afterwards."""
        if self.is_local:
            return None
        if not self.is_s3:
            return (f"conditional writes are implemented for S3 and local disk only, not for "
                    f"{type(self.fs).__name__}")
        rel = f"_probe-conditional-{uuid.uuid4().hex}"
        first, second, third = (f"{uuid.uuid4().hex}".encode() for _ in range(3))

        def holds(data: bytes) -> bool:  # a PUT that landed but whose retry failed its precondition
            found = self.read_versioned(rel)
            return found is not None and found[0] == data

        try:
            try:
                etag = self.create(rel, first)
            except PreconditionFailed:
                if not holds(first):
                    return "it refused a PUT with If-None-Match: * on a new object"
                etag = self.read_versioned(rel)[1]  # type: ignore[index]
            try:
                self.create(rel, second)
                return "it accepted a second PUT with If-None-Match: * on an existing object"
            except PreconditionFailed:
                pass
            try:
                self.replace(rel, second, '"00000000000000000000000000000000"')
                return "it accepted a PUT with an If-Match that does not match"
            except PreconditionFailed:
                pass
            try:
                self.replace(rel, third, etag)
            except PreconditionFailed:
                if not holds(third):
                    return "it refused a PUT whose If-Match is the ETag it returned"
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EINVAL):  # 501 NotImplemented, 400 InvalidArgument and the like
                return f"it rejected a conditional PUT ({exc})"
            raise  # a store error (network, permissions): not a verdict on the store
        finally:
            try:
                self.delete([rel])
            except OSError:
                pass

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

    def list_files_modified(self, rel_dir: str) -> dict[str, float | None]:
        """Every file under `rel_dir` (relative to the root, sorted) with its last-modified time in seconds since
        the epoch (local: mtime; S3: LastModified, the store's clock), None where the store gives none."""
        base = self.path(rel_dir)
        self.fs.invalidate_cache(base)
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        out = {}
        for p, info in found.items():
            rel = posixpath.relpath(self.fs._strip_protocol(p), self.root)
            if rel != posixpath.normpath(rel_dir or "."):  # not a store's folder marker
                out[rel] = _modified(info)
        return dict(sorted(out.items()))

    def list_file_sizes(self, rel_dir: str) -> dict[str, int | None]:
        """Every file under `rel_dir` (relative to the root, `..` resolved, sorted) with its size in bytes from the
        listing itself (no object is read), None where the store gives none."""
        base = self.path(rel_dir)
        self.fs.invalidate_cache(base)
        if not self.fs.exists(base):
            return {}
        out = {}
        for p, info in self.fs.find(base, detail=True).items():
            rel = posixpath.relpath(self.fs._strip_protocol(p), self.root)
            if rel != posixpath.normpath(rel_dir or "."):  # not a store's folder marker
                size = info.get("size", info.get("Size"))
                out[rel] = None if size is None else int(size)
        return dict(sorted(out.items()))

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

    def remove_empty_folders(self, rel_dir: str) -> None:
        """Local disk: remove the folders under `rel_dir` (and it) that are empty, deepest first; a folder that holds
        anything stays (`rmdir` refuses it), so this can never remove a file. Object stores have no folders."""
        if not self.is_local:
            return
        top = self.path(rel_dir)
        for folder, _, _ in sorted(os.walk(top, topdown=False), key=lambda w: -w[0].count(os.sep)):
            try:
                os.rmdir(folder)
            except OSError:
                pass
        self.fs.invalidate_cache()

    def delete(self, rels: list[str], missing_ok: bool = False) -> None:
        """Delete these files (`missing_ok`: one already gone is no error, as on S3)."""
        if rels and missing_ok and self.is_local:
            for rel in rels:
                try:
                    os.unlink(self.path(rel))
                except FileNotFoundError:
                    pass
        elif rels:
            self.fs.rm([self.path(r) for r in rels])
        self.fs.invalidate_cache()


def _modified(info: dict[str, Any]) -> float | None:
    """A listing entry's last-modified time as epoch seconds (datetime on S3, a float on local disk)."""
    for key in ("LastModified", "mtime", "last_modified", "updated"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


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
            raise InputError(f"input.paths: access denied listing {pattern!r} ({exc}); check input.storage_options "
                             "key and secret and their permissions on this path") from None
        found = {p: info for p, info in matches.items() if info.get("type", "file") == "file"}
        if not found:
            raise InputError(f"input.paths: {pattern!r} matches no file")
        for p, info in found.items():
            url = proto + p
            if url not in files:
                rel = posixpath.relpath(p, base) if base else p
                files[url] = InputFile(url=url, rel=rel, size=int(info.get("size") or 0), version=object_version(info))
    return [files[k] for k in sorted(files)]


def open_input(url: str, storage_options: dict[str, Any]):
    """Open one input file for binary reading."""
    return fsspec.open(url, "rb", **storage_options).open()


def input_info(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """What the store says about one input file now (size, ETag/mtime), never from a cached listing."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    fs.invalidate_cache(path)
    return fs.info(path)


def changed_while_reading(exc: BaseException) -> bool:
    """Whether a read failed because the object is no longer the version it was opened as: s3fs sends every
    range GET with `If-Match: <ETag at open>` and raises `FileExpired` (or a 412) when it changed."""
    return type(exc).__name__ == "FileExpired" or (isinstance(exc, OSError) and _is_precondition_failure(exc)
                                                  and not isinstance(exc, FileExistsError))


# -- compressed inputs ---------------------------------------------------------------------------------------

COMPRESSION_PACKAGES = {"zst": "backports.zstd (Python < 3.14) or zstandard", "lz4": "lz4", "lzma": "lzmaffi"}
"""Name suffixes fsspec decompresses only with an optional package, and that package."""


def compression_of(url: str) -> str | None:
    """The codec fsspec infers from the file's name (`gzip` for `.gz`, `zstd` for `.zst`, …), None if plain."""
    from fsspec.utils import infer_compression

    return infer_compression(url)


def decompressing(fh: Any, codec: str) -> Any:
    """A binary file object reading `fh` through `codec` (one of `fsspec.compression.compr`)."""
    from fsspec.compression import compr

    return compr[codec](fh, mode="rb")


def read_head(url: str, storage_options: dict[str, Any], n: int) -> bytes:
    """The first `n` bytes of one input file (one small ranged GET on a store)."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs.cat_file(path, start=0, end=n)


# -- store errors as one line ---------------------------------------------------------------------------------

_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "InvalidClientTokenId", "AuthorizationHeaderMalformed")


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every error behind it (`cause` of Ray's wrappers, `__cause__`, `__context__`)."""
    seen: dict[int, BaseException] = {}
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen[id(e)] = e
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return list(seen.values())


def storage_error(exc: BaseException) -> str | None:
    """One line naming the setting to fix, when `exc` is a store refusing us (credentials, endpoint, bucket,
    permissions) rather than a bug; None otherwise. Used by the CLI for every command."""
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return ("S3: no usable credentials; set storage_options key and secret (or AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, or an AWS profile)")
    code = next((c for c in _CREDENTIAL_CODES if c in text), None)
    if code is not None:
        return (f"S3 refused the credentials ({code}); check storage_options key and secret (or "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                "ProxyConnectionError"} or "Could not connect to the endpoint URL" in text:
        endpoint = re.search(r'endpoint URL: "(\w+://[^/"]+)', text)
        where = f" {endpoint.group(1)}" if endpoint else ""
        return f"S3: cannot reach the endpoint{where}; check storage_options endpoint_url (or AWS_ENDPOINT_URL)"
    if "NoSuchBucket" in text or "The specified bucket does not exist" in text:
        return "S3: the bucket does not exist; check the bucket in the path (or storage_options endpoint_url)"
    denied = next((e for e in chain if isinstance(e, PermissionError)), None)
    if denied is not None or "AccessDenied" in text:
        detail = str(denied).splitlines()[0] if denied is not None and str(denied) else "AccessDenied"
        return (f"S3: access denied ({detail}); check storage_options key and secret (or AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY) and that they may use this path")
    return None
