"""Prompt templates of the Qwen3 embedding recipe (model card)."""

from __future__ import annotations


def format_query(instruction: str, text: str) -> str:
    """A query with its one-sentence task, exactly as the Qwen3-Embedding card formats it."""
    return f"Instruct: {instruction}\nQuery:{text}"


def format_texts(texts: list[str], instruction: str | None) -> list[str]:
    """Documents pass unchanged; with an instruction every text is a query."""
    if instruction is None:
        return list(texts)
    return [format_query(instruction, t) for t in texts]
