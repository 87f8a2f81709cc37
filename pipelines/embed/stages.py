"""The CPU stage ahead of the embedding replicas: read one work item, tokenise its rows.

Its own module, free of torch and transformers (a test holds it to that), because Ray
imports a task function's module in every worker process that runs it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from actors.tokenize import tokenize_batch
from common.columns import ID, ITEM_JSON, READ_BOOKKEEPING, TOKENIZED
from pipelines.embed.config import InputConfig
from pipelines.input.reading import read_items
from pipelines.stages import EVERY_COLUMN, stage


@stage(needs=(ITEM_JSON,), adds=(ID, *READ_BOOKKEEPING, *TOKENIZED), drops=EVERY_COLUMN)
def read_and_tokenize(batch: pa.Table, cfg: InputConfig, tokenizer: dict[str, Any]) -> pa.Table:
    """One planned item in, its rows out with token ids (rejected rows carry none) and the input's pass-through
    columns (which the graph adds to the declaration from the config)."""
    return tokenize_batch(read_items(batch, cfg), **tokenizer)
