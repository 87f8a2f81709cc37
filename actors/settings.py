"""What one model replica loads and how it runs: typed settings, built by the pipeline, read by the replica.

Free of torch on purpose: the pipeline builds these from its config (it never imports torch), Ray ships
them to each replica, and the replica (`actors.embedder`, `actors.reranker`) loads its model from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from actors.quantize import VectorSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReplicaSettings:
    """The model to load, where it computes, and the token budget of its forward passes."""

    path: str
    """Hub id, local directory or object-store URL of the model."""
    revision: str | None = None
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (`dtype_name`)."""
    num_gpus: float = 0
    num_cpus: float = 1
    threads: int | None = None
    """Torch threads of a CPU replica; None = its CPUs (`num_threads`)."""
    max_batch_tokens: int = 16384
    batch_overhead_tokens: int | None = None
    """What one forward pass costs beyond its tokens; None = the device's default."""
    storage_options: dict[str, Any] | None = None
    """fsspec options to fetch a model whose path is an object-store URL (ignored for other paths)."""
    model_digest: str | None = None
    """The listing digest a URL model must still have (ignored for other paths)."""

    @property
    def num_threads(self) -> int:
        """Threads of a CPU replica: `threads`, else the CPUs reserved for it, at least one."""
        return self.threads or max(1, int(self.num_cpus))


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbedSettings(ReplicaSettings):
    """An embedding replica: MRL truncation and the stored vector type on top of the model settings."""

    dimensions: int | None = None
    """Keep the first N dimensions, then re-normalise; None = full size."""
    vector_dtype: str = "float32"
    """Element type of the vectors the replica returns: float32 or float16."""
    vectors: list[VectorSpec] | None = None
    """Several columns from the pooled vector (`actors.quantize`), replacing the single `embedding` of
    `vector_dtype`; a spec's `dimensions` None is the pooled width."""
    packed: bool | None = None
    """Padding-free forward passes (micro-batches packed into one sequence, variable-length attention);
    None = where a varlen kernel works (a GPU in bfloat16/float16), padded batches elsewhere."""
    token_buckets: bool = False
    """Packed micro-batches padded up to a few fixed token counts (powers of two up to the budget) so that
    shapes repeat; the padding counts as computed tokens. Only with packing (ignored on padded batches).
    Off until CUDA graphs / compile make it pay."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RerankSettings(ReplicaSettings):
    """A reranker replica: the prompt's instruction, the pair length limit and prefix sharing."""

    instruction: str | None = None
    """Task instruction of the `<Instruct>:` line; None = the model card's default."""
    max_length: int = 8192
    share_prefix: bool = True


def dtype_name(dtype: str, on_gpu: bool) -> str:
    """The compute dtype `dtype` stands for: `auto` is bfloat16 on GPU (fp16 overflows on Qwen3-8B) and float32
    on CPU. The one rule, shared by the replicas (which load in it) and the job fingerprint (which records it)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if on_gpu else "float32"
