"""What an fsspec listing says about an object's version: the tag that changes when its bytes change."""

from __future__ import annotations

from typing import Any


def object_version(info: dict[str, Any]) -> str:
    """The ETag (S3), md5 hash or generation (GCS) of a listed object; on a local disk, its mtime."""
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return str(mtime.timestamp() if hasattr(mtime, "timestamp") else mtime)
