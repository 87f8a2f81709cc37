"""Prompt template of the Qwen3-Reranker recipe (model card).

The reranker is a causal LM asked to answer "yes" or "no": the score is
P(yes) at the position after the suffix. The system prefix and the
instruction come first, so every candidate of one query shares them.
"""

from __future__ import annotations

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

SYSTEM_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)

ASSISTANT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def format_pair(instruction: str | None, query: str, doc: str) -> str:
    """The user turn for one (query, document) pair; `None` means the card's default instruction."""
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
