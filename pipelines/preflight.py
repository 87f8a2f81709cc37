"""Model checks that need no Ray, run before any work starts: a missing or unsafe model fails in seconds."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from common.errors import ModelLoadError
from common.model_cache import is_model_url, read_remote_json, remote_model
from common.model_families import check_architecture


def _check_model_config(path: str, config: dict[str, Any], dimensions: int | None, task: str) -> None:
    check_architecture(path, config, task)
    if config.get("embedrank_random_init"):
        print(f"NOTE: {path} is a randomly initialised model; its outputs are not meaningful", file=sys.stderr)
    hidden = config.get("hidden_size")
    if dimensions and hidden and dimensions > hidden:
        raise ModelLoadError(f"model.dimensions={dimensions} exceeds the model's embedding size {hidden}")


def preflight_model(path: str, dimensions: int | None = None, storage_options: dict[str, Any] | None = None,
                    revision: str | None = None, task: str = "embed") -> None:
    """A local or remote (URL) model directory exists, holds config.json and safetensors weights, is an
    architecture `task` (embed or rerank) implements, and fits the requested dimensions. A URL model is only
    listed here (and its config.json read); replicas fetch it. A hub id is checked where it is loaded."""
    if is_model_url(path):
        if revision is not None:
            raise ModelLoadError(f"model.revision is for hub ids; model.path {path!r} is a URL, versioned by "
                                 "its files (use a new path per model version)")
        remote_model(path, storage_options)
        _check_model_config(path, read_remote_json(path, "config.json", storage_options), dimensions, task)
        return
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")):
            raise ModelLoadError(f"model.path {path!r} is not a model directory")
        return
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelLoadError(f"model.path {path!r} has no config.json")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        raise ModelLoadError(
            f"model.path {path!r} has no .safetensors weights"
            + (f" (only pickle files {pickled}, which embedrank never loads: convert them to safetensors)"
               if pickled else ""))
    with open(config_file) as fh:
        _check_model_config(path, json.load(fh), dimensions, task)
