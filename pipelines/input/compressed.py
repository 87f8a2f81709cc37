"""Compressed JSONL inputs (`.jsonl.gz`, `.jsonl.zst`, `.jsonl.bz2`, `.jsonl.xz`, … whatever fsspec infers from
the name): read whole and decompressed as they stream, never cut into byte ranges (a compressed stream has no
offsets to cut at).

Nothing unreadable becomes rejected rows. Planning refuses a name whose suffix no installed codec reads, and a
file whose first bytes are not that codec's header (`check_planned`); a stream that breaks further in fails the
job naming the file (`DecompressError` → `InputError`). A file named plain `.jsonl` whose bytes start with a
compression header is refused when read, instead of rejecting every line as `invalid_utf8`.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.errors import InputError
from pipelines.storage import COMPRESSION_PACKAGES, compression_of, read_head

MAGIC = {
    "gzip": (b"\x1f\x8b",),
    "bz2": (b"BZh",),
    "zstd": (b"\x28\xb5\x2f\xfd",),
    "xz": (b"\xfd7zXZ\x00",),
    "lz4": (b"\x04\x22\x4d\x18",),
    "zip": (b"PK\x03\x04",),
}
"""The first bytes of a stream of each codec (the format's magic number)."""

HEAD_BYTES = 8
HEAD_THREADS = 16


def sniff(head: bytes) -> str | None:
    """The codec whose header `head` starts with, None if none does."""
    return next((codec for codec, starts in MAGIC.items() if head.startswith(starts)), None)


def codec_for(url: str) -> str | None:
    """The codec a JSONL input is read through (None: plain `.jsonl`); `InputError` for a name no codec reads."""
    name = posixpath.basename(url.split("://", 1)[-1])
    if name.endswith(".jsonl"):
        return None
    codec = compression_of(name)
    if codec is not None:
        return codec
    suffix = name.rsplit(".", 1)[-1]
    package = COMPRESSION_PACKAGES.get(suffix)
    from fsspec.utils import compressions

    readable = ", ".join(f".jsonl.{ext}" for ext in sorted(compressions))
    raise InputError(f"input.paths: {url}: cannot read a '.{suffix}' file"
                     + (f" (needs the {package} package)" if package else "")
                     + f"; JSONL inputs are .jsonl or compressed {readable}")


def check_planned(urls: list[str], storage_options: dict[str, Any]) -> None:
    """Refuse at planning any compressed input whose first bytes are not its codec's header (one small read each)."""
    targets = [(u, c) for u in urls if (c := codec_for(u)) is not None and c in MAGIC]
    if not targets:
        return

    def head(target: tuple[str, str]) -> tuple[str, str, bytes]:
        url, codec = target
        return url, codec, read_head(url, storage_options, HEAD_BYTES)

    with ThreadPoolExecutor(max_workers=min(HEAD_THREADS, len(targets))) as pool:
        for url, codec, data in pool.map(head, targets):
            if sniff(data) != codec:
                found = sniff(data)
                raise InputError(f"input.paths: {url}: named as {codec} but "
                                 + (f"its bytes are {found}" if found else "it does not start with a "
                                    f"{codec} header ({len(data)} bytes read)")
                                 + "; rename or recompress it")


def refuse_mislabelled(url: str, data: bytes) -> None:
    """A plain `.jsonl` whose bytes start with a compression header: refused, instead of rejecting its lines."""
    codec = sniff(data[:HEAD_BYTES])
    if codec is not None:
        raise InputError(f"{url}: named .jsonl but its bytes are {codec}-compressed; name it with the codec's "
                         "suffix (e.g. .jsonl.gz, .jsonl.zst) so it is decompressed")
