"""The CPU stage ahead of the embedding replicas: read one work item, tokenise its rows.

Its own module, free of torch and transformers (a test holds it to that), because Ray
imports a task function's module in every worker process that runs it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from actors.tokenize import tokenize_batch
from pipelines.config import InputConfig
from pipelines.input.reading import read_items


def read_and_tokenize(batch: pa.Table, cfg: InputConfig, tokenizer: dict[str, Any]) -> pa.Table:
    """One planned item in, its rows out with token ids (rejected rows carry none)."""
    return tokenize_batch(read_items(batch, cfg), **tokenizer)
