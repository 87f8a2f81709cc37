"""The model families embedrank implements: a model of another architecture is refused, never embedded wrongly.

Checked twice: at preflight from the directory's config.json (local or URL models, before any work), and where a
replica loads the model (hub ids, whose config the driver does not fetch).
"""

from __future__ import annotations

from typing import Any

from common.errors import ModelLoadError

SUPPORTED: dict[str, tuple[str, ...]] = {
    "embed": ("Qwen3Model", "Qwen3ForCausalLM"),
    "rerank": ("Qwen3ForCausalLM",),
}
"""Architectures (config.json `architectures`, `model_type` "qwen3") whose pooling and prompts each job implements:
Qwen3-Embedding's last-token pooling and query template, Qwen3-Reranker's yes/no logits and chat template. A BGE
or E5 checkpoint (BERT/XLM-R: CLS or mean pooling, other prompts) would load and give wrong vectors silently."""


def check_architecture(path: str, config: dict[str, Any], task: str) -> None:
    """Refuse a model whose architecture this job's pooling and prompts do not fit, naming what is supported."""
    supported = SUPPORTED[task]
    kind = config.get("model_type")
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if kind == "qwen3" and (not architectures or any(a in supported for a in architectures)):
        return
    found = ", ".join(architectures) or "no architectures"
    raise ModelLoadError(
        f"model.path {path!r} is a {kind or 'unknown'} model ({found}); {task} implements the pooling and prompts "
        f"of Qwen3 only (model_type qwen3: {' or '.join(supported)}, e.g. "
        f"{'Qwen/Qwen3-Reranker-0.6B' if task == 'rerank' else 'Qwen/Qwen3-Embedding-0.6B'}), so other models "
        "are refused rather than embedded wrongly")
