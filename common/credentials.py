"""What counts as a credential in a mapping of options, and the same mapping without them.

Used wherever options are shown or stored: model-cache messages scrub credential values
(`common.model_cache.scrub`), and an output's `_job.json` records an Iceberg catalog's properties without them.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CREDENTIAL_KEY = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)
"""An option name that holds a credential (`s3.secret-access-key`, `token`, `credential`, `password`, …)."""


def without_password(value: str) -> str:
    """A URL with its password cut (`postgresql://user:pw@host/db` → `postgresql://user@host/db`); any other
    string as it is."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host))


def without_credentials(options: dict[str, Any]) -> dict[str, Any]:
    """`options` without credential-named entries and with passwords cut from URLs."""
    return {k: without_password(v) if isinstance(v, str) else v
            for k, v in options.items() if not CREDENTIAL_KEY.search(k)}
