"""Models in object storage: `model.path: s3://bucket/models/qwen3-embedding-0.6b/` (any fsspec URL).

A URL model is fetched once per node into a local cache and then loaded like a
local directory. fsspec only (no torch): the driver's preflight and fingerprint
use the listing, the replicas and the tokenize tasks call `local_model_dir`.

Cache key. `<cache root>/<last URL part>-<key>`, `key` a hash of the URL and
of the remote listing of the files a model needs (name, size, ETag or another
version tag). A changed remote model lists differently, so it gets a new
directory and a cached copy is never mistaken for it. The tokenize stage asks
for `weights=False` and gets a separate, small entry (`…-tokenizer`) with no
weights, so CPU-only nodes never pull gigabytes to tokenise.

Checksums. ETags are not content hashes in general (multipart uploads give
`md5-of-md5s-N`, SSE-KMS objects an opaque value), so they are used as
version tags only, never to verify bytes. Each downloaded file must have
exactly the size the listing gave (a short read or a truncated copy fails),
and the sha256 of the bytes on disk is written to a manifest
(`.embedrank-manifest.json`) before the directory is published. Every later
use re-hashes the files against that manifest: a cached file that changed
(disk corruption, a stray edit) is detected, reported, and the entry is fetched
again. Re-hashing costs about a second per GB, once per process that resolves
the model (callers memoise), which is small next to loading the weights.

Publication. Files go into a temp directory next to the final one
(`<name>.partial-…`) and are renamed into place only when complete and
verified, so a crashed download is never used; leftover partials are deleted by
the next process that takes the entry's exclusive lock.

Locking. One lock file per entry (`<name>.lock`), `fcntl.flock`: using an entry
takes a shared lock (many replicas verify and load at once); fetching or
repairing it takes the exclusive lock, and whoever gets it first downloads while
the others block, then find the entry complete and reuse it. The cache root
must be a local filesystem (flock on network filesystems is not reliable).

Storage options (credentials) are used to connect only: they are not part of
the key, never written to the cache, and scrubbed from error messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any, Iterator

import fsspec

from common.credentials import CREDENTIAL_KEY
from common.errors import ModelLoadError
from common.object_version import object_version

CACHE_ENV = "EMBEDRANK_MODEL_CACHE"
MANIFEST = ".embedrank-manifest.json"

TOKENIZER_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
})
"""Small files a model needs besides its weights (config, tokenizer, generation defaults)."""

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_model_url(path: str) -> bool:
    """A `model.path` in object storage (any fsspec URL); hub ids and local paths have no `://`."""
    return "://" in path


def default_cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "embedrank", "models")


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def _needed(name: str) -> bool:
    return name in TOKENIZER_FILES or is_weight_file(name)


def _secrets(options: Any) -> Iterator[str]:
    if isinstance(options, dict):
        for k, v in options.items():
            if isinstance(v, str) and CREDENTIAL_KEY.search(str(k)) and len(v) >= 4:
                yield v
            else:
                yield from _secrets(v)
    elif isinstance(options, (list, tuple)):
        for v in options:
            yield from _secrets(v)


def scrub(message: str, storage_options: dict[str, Any] | None) -> str:
    """`message` with every credential-like value of `storage_options` replaced by `***`."""
    for secret in sorted(set(_secrets(storage_options or {})), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    version: str


@dataclasses.dataclass(frozen=True)
class RemoteModel:
    """The files of a remote model directory that a model needs, as listed now."""

    url: str
    files: tuple[RemoteFile, ...]

    @property
    def digest(self) -> str:
        """Names, sizes and versions of the needed files: changes whenever the remote model does."""
        listing = [[f.name, f.size, f.version] for f in self.files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]

    def subset(self, weights: bool) -> tuple[RemoteFile, ...]:
        return self.files if weights else tuple(f for f in self.files if not is_weight_file(f.name))

    def entry_name(self, weights: bool) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", self.url.rsplit("/", 1)[-1])[:64].strip("._") or "model"
        key = hashlib.sha256(f"{self.url}\n{self.digest}".encode()).hexdigest()[:16]
        return f"{slug}-{key}" + ("" if weights else "-tokenizer")


def _connect(url: str, storage_options: dict[str, Any] | None):
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as exc:
        raise ModelLoadError(f"model.path {url!r}: cannot open this URL ({scrub(str(exc), storage_options)})") from None
    return fs, root.rstrip("/")


def remote_model(url: str, storage_options: dict[str, Any] | None) -> RemoteModel:
    """List a remote model directory; refuse one that is missing, lacks config.json or safetensors weights."""
    url = url.rstrip("/")
    fs, root = _connect(url, storage_options)
    try:
        fs.invalidate_cache(root)
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise ModelLoadError(f"model.path {url!r} does not exist") from None
    except PermissionError as exc:
        raise ModelLoadError(f"model.path {url!r}: access denied ({scrub(str(exc), storage_options)}); "
                             "check model.storage_options (null = the input's)") from None
    except OSError as exc:
        raise ModelLoadError(f"model.path {url!r}: cannot list it ({scrub(str(exc), storage_options)})") from None
    files = {posixpath.basename(e["name"].rstrip("/")): e for e in entries if e.get("type", "file") == "file"}
    if len(entries) == 1 and entries[0]["name"].rstrip("/") == root and files:
        raise ModelLoadError(f"model.path {url!r} is a file, not a model directory")
    if not entries:
        raise ModelLoadError(f"model.path {url!r} does not exist or is empty")
    if "config.json" not in files:
        raise ModelLoadError(f"model.path {url!r} has no config.json")
    if not any(n.endswith(".safetensors") for n in files):
        pickled = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
        raise ModelLoadError(
            f"model.path {url!r} has no .safetensors weights"
            + (f" (only pickle files {pickled}, which embedrank never loads: convert them to safetensors)"
               if pickled else ""))
    needed = tuple(RemoteFile(name, int(info.get("size") or 0), object_version(info))
                   for name, info in sorted(files.items()) if _needed(name))
    return RemoteModel(url=url, files=needed)


def read_remote_json(url: str, name: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """One small JSON file of a remote model directory (config.json), parsed."""
    fs, root = _connect(url.rstrip("/"), storage_options)
    try:
        return json.loads(fs.cat_file(f"{root}/{name}"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.path {url!r}: cannot read {name} ({scrub(str(exc), storage_options)})") from None


@dataclasses.dataclass(frozen=True)
class CachedModel:
    path: str
    downloaded: bool
    """True when this call fetched the files (first use on the node, or a repair)."""


@contextlib.contextmanager
def _flock(path: str, mode: int, waiting_note: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting_note, file=sys.stderr, flush=True)
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _problem(entry: str, files: tuple[RemoteFile, ...]) -> str | None:
    """Why a cached entry cannot be used as `files` (None: it is complete and every checksum matches)."""
    try:
        with open(os.path.join(entry, MANIFEST)) as fh:
            manifest = json.load(fh)["files"]
    except FileNotFoundError:
        return "missing" if not os.path.exists(entry) else "no manifest"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if sorted(manifest) != sorted(f.name for f in files):
        return "manifest lists other files"
    for f in files:
        full = os.path.join(entry, f.name)
        recorded = manifest[f.name]
        if (recorded.get("size"), recorded.get("version")) != (f.size, f.version):
            return f"{f.name}: manifest is for another version"
        try:
            if os.path.getsize(full) != f.size:
                return f"{f.name}: size differs"
            if _sha256(full) != recorded.get("sha256"):
                return f"{f.name}: sha256 differs from the manifest"
        except OSError:
            return f"{f.name}: missing"
    return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _download(model: RemoteModel, files: tuple[RemoteFile, ...], cache_root: str, name: str,
              storage_options: dict[str, Any] | None) -> None:
    """Fetch `files` into a temp dir, check sizes, write the sha256 manifest, rename it to `name`."""
    fs, root = _connect(model.url, storage_options)
    tmp = tempfile.mkdtemp(prefix=f"{name}.partial-", dir=cache_root)
    try:
        started = time.monotonic()
        total = sum(f.size for f in files)
        print(f"embedrank: fetching model {model.url} ({len(files)} files, {total / 1e6:.1f} MB) into "
              f"{os.path.join(cache_root, name)}", file=sys.stderr, flush=True)
        try:
            fs.get([f"{root}/{f.name}" for f in files], [os.path.join(tmp, f.name) for f in files])
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model.path {model.url!r}: download failed "
                                 f"({scrub(str(exc), storage_options)})") from None
        manifest: dict[str, dict[str, Any]] = {}
        for f in files:
            local = os.path.join(tmp, f.name)
            size = os.path.getsize(local) if os.path.exists(local) else -1
            if size != f.size:
                raise ModelLoadError(f"model.path {model.url!r}: {f.name} arrived with {size} bytes, the listing "
                                     f"says {f.size} (changed during the download, or a short read); retry")
            with open(local, "rb") as fh:
                os.fsync(fh.fileno())
            manifest[f.name] = {"size": f.size, "version": f.version, "sha256": _sha256(local)}
        with open(os.path.join(tmp, MANIFEST), "w") as fh:
            json.dump({"url": model.url, "digest": model.digest, "files": manifest}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = os.path.join(cache_root, name)
        if os.path.exists(final):  # a damaged copy: we hold the exclusive lock, nobody else is reading it in
            doomed = os.path.join(cache_root, f"{name}.bad-{uuid.uuid4().hex[:8]}")
            os.rename(final, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(cache_root)
        print(f"embedrank: fetched model {model.url} in {time.monotonic() - started:.1f}s", file=sys.stderr,
              flush=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_local_model(url: str, storage_options: dict[str, Any] | None, cache_root: str | None = None, *,
                       weights: bool = True, expected_digest: str | None = None) -> CachedModel:
    """`local_model_dir`, also saying whether this call downloaded."""
    model = remote_model(url, storage_options)
    if expected_digest is not None and model.digest != expected_digest:
        raise ModelLoadError(f"model.path {model.url!r} changed since the job started (listing digest "
                             f"{model.digest}, the job's fingerprint has {expected_digest}); rerun the job")
    cache_root = os.path.abspath(cache_root or default_cache_root())
    os.makedirs(cache_root, exist_ok=True)
    files = model.subset(weights)
    name = model.entry_name(weights)
    final = os.path.join(cache_root, name)
    lock = os.path.join(cache_root, f"{name}.lock")
    note = f"embedrank: waiting for another process fetching {model.url} into {final}"
    with _flock(lock, fcntl.LOCK_SH, note):
        problem = _problem(final, files)
        if problem is None:
            return CachedModel(final, downloaded=False)
    with _flock(lock, fcntl.LOCK_EX, note):
        problem = _problem(final, files)  # another process may have fetched it while we waited
        if problem is None:
            return CachedModel(final, downloaded=False)
        for stale in os.listdir(cache_root):
            if stale.startswith((f"{name}.partial-", f"{name}.bad-")):
                shutil.rmtree(os.path.join(cache_root, stale), ignore_errors=True)
        if problem != "missing":
            print(f"WARNING: cached model {final} is damaged ({problem}); fetching it again", file=sys.stderr,
                  flush=True)
        _download(model, files, cache_root, name, storage_options)
    return CachedModel(final, downloaded=True)


def local_model_dir(url: str, storage_options: dict[str, Any] | None, cache_root: str | None = None, *,
                    weights: bool = True, expected_digest: str | None = None) -> str:
    """A verified local copy of the model directory at `url`, fetched once per node (see the module docstring).

    `cache_root` defaults to $EMBEDRANK_MODEL_CACHE or ~/.cache/embedrank/models. `weights=False` fetches
    config and tokenizer files only. `expected_digest` (the job fingerprint's `model_digest`) refuses a
    remote model that changed since the driver fingerprinted it. Raises ModelLoadError.
    """
    return ensure_local_model(url, storage_options, cache_root, weights=weights,
                              expected_digest=expected_digest).path


_RESOLVED: dict[tuple, str] = {}


def resolve_model_path(path: str, storage_options: dict[str, Any] | None = None, *, weights: bool = True,
                       expected_digest: str | None = None) -> str:
    """The directory to load: `path` itself (hub id, local dir), or for a URL its verified local copy.

    A URL is fetched once per node (`local_model_dir`) and resolved once per process; `weights=False`
    fetches config and tokenizer files only (the tokenize stage)."""
    if not is_model_url(path):
        return path
    key = (path, json.dumps(storage_options or {}, sort_keys=True, default=repr), weights, expected_digest)
    if key not in _RESOLVED:
        _RESOLVED[key] = local_model_dir(path, storage_options, weights=weights, expected_digest=expected_digest)
    return _RESOLVED[key]
