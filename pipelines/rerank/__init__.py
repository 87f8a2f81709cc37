"""The reranking job: its config, join and rank stages, and its spec."""
