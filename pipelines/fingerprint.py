"""The job fingerprint: everything that changes the vectors, so two models never mix in one output."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from pipelines import __version__
from pipelines.config import EmbedJobConfig, RerankJobConfig


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


def resolved_dtype(dtype: str, num_gpus: float) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if num_gpus > 0 else "float32"


def embed_fingerprint(cfg: EmbedJobConfig) -> dict[str, Any]:
    m = cfg.model
    return {
        "task": "embed",
        "model": m.path,
        "revision": m.revision,
        "model_digest": model_digest(m.path, cfg.model_storage_options),
        "dtype": resolved_dtype(m.dtype, cfg.compute.num_gpus),
        "pooling": "last_token",
        "normalization": "l2",
        "dimensions": m.dimensions,
        "instruction": m.instruction,
        "max_length": m.max_length,
        "vector_dtype": cfg.output.vector_dtype,
        "partition_by": cfg.output.partition_by,
        "embedrank_version": __version__,
    }


def rerank_fingerprint(cfg: RerankJobConfig) -> dict[str, Any]:
    m = cfg.model
    return {
        "task": "rerank",
        "model": m.path,
        "revision": m.revision,
        "model_digest": model_digest(m.path, cfg.model_storage_options),
        "dtype": resolved_dtype(m.dtype, cfg.compute.num_gpus),
        "score": "softmax(no, yes) at the last position",
        "instruction": m.instruction,
        "max_length": m.max_length,
        "top_k": cfg.output.top_k,
        "rank_buckets": cfg.output.rank_buckets,
        "embedrank_version": __version__,
    }


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))
