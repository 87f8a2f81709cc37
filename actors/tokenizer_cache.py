"""The tokenizer spec that transformers builds for a local model directory, kept on disk by content.

A driver needs the spec once per job (`actors.tokenize.tokenizer_spec`), but building it means transformers'
tokenizer loading, which imports torch: about 5 CPU-seconds and 400 MiB in every job process, for a result that
depends only on a few small files. The entry's key is everything the spec is a function of: the bytes of the
directory's tokenizer and config files, the revision asked for, and the versions of
transformers and tokenizers that built it. A changed file or an upgraded library makes a new key, never a stale
hit. An entry is written whole (a temporary file, then a rename), so drivers racing on one at worst build it
twice. Hub ids are not cached: their files are only known once transformers has fetched them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
from collections.abc import Callable

from common.model_cache import TOKENIZER_FILES, default_cache_root

SPECS_DIR = "tokenizer-specs"
"""The entries' folder, inside the node's model cache (`common.model_cache.default_cache_root`)."""


def _key_files(path: str) -> list[str]:
    """The directory's files that a tokenizer load reads (`TOKENIZER_FILES`, the set a URL model's tokenize
    stage fetches), of those it has."""
    return [n for n in sorted(TOKENIZER_FILES) if os.path.isfile(os.path.join(path, n))]


def spec_key(path: str, revision: str | None) -> str:
    """The cache key of `path`'s spec (see the module docstring)."""
    h = hashlib.sha256()
    for dist in ("transformers", "tokenizers"):
        h.update(f"{dist}={importlib.metadata.version(dist)}\n".encode())
    h.update(f"revision={revision}\n".encode())
    for name in _key_files(path):
        with open(os.path.join(path, name), "rb") as fh:
            h.update(f"{name}\n".encode() + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def cached_spec(path: str, revision: str | None, build: Callable[[], str], cache_root: str | None = None) -> str:
    """`build()`'s spec for the model directory `path`, from the cache where an earlier call stored it."""
    if not os.path.isdir(path):
        return build()
    folder = os.path.join(cache_root or default_cache_root(), SPECS_DIR)
    entry = os.path.join(folder, spec_key(path, revision) + ".json")
    try:
        with open(entry, encoding="utf-8") as fh:
            return fh.read()
    except OSError:  # not cached yet (or an unreadable cache: built as if it were not)
        pass
    spec = build()
    tmp = f"{entry}.tmp-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(spec)
        os.replace(tmp, entry)
    except OSError:  # a read-only or full cache only costs the next job the build
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return spec
