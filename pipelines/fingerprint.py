"""Job fingerprints: everything that changes the output, so two models never mix in one output.

What every job shares is here (the model's identity, the id, the refusal message); each job adds its own keys,
and its sources' settings that change rows (`SourceConfig.row_settings`) as nested sections."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from actors.settings import dtype_name
from pipelines.config import JobConfigBase


def _local_model_digest(path: str) -> str | None:
    """For a local model directory, a digest of its config and weight files (names, sizes)."""
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json":
            with open(full, "rb") as fh:
                h.update(fh.read())
        elif name.endswith(".safetensors"):
            h.update(f"{name}:{os.path.getsize(full)}".encode())
    return h.hexdigest()[:16]


def model_digest(path: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """A digest that changes with the model: of a local directory's files, or of a remote one's listing.

    For a URL (`model.path: s3://…`) it is the listing's names, sizes and ETags (`common.model_cache`);
    replicas refuse to load a remote model whose listing no longer has it. Hub ids: None (pin a revision)."""
    from common.model_cache import is_model_url, remote_model

    if is_model_url(path):
        return remote_model(path, storage_options).digest
    return _local_model_digest(path)


def model_identity(cfg: JobConfigBase) -> dict[str, Any]:
    """Which weights compute, in which precision: the fingerprint keys every task shares. A job's fingerprint
    (`pipelines/<job>/job.py`) adds what else changes its output, and `embedrank_version`."""
    m = cfg.model
    return {"model": m.path, "revision": m.revision, "model_digest": model_digest(m.path, cfg.model_storage_options),
            "dtype": dtype_name(m.dtype, on_gpu=cfg.compute.num_gpus > 0)}


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(fingerprint: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections (`input`, `documents`) as dotted keys, so a difference names the setting as a config does."""
    flat: dict[str, Any] = {}
    for key, value in fingerprint.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Each setting that differs, `input.text_column: 'body' → 'title'`: what a refused resume names."""
    old, new = _flatten(old), _flatten(new)
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))
