"""The reindex job: its config, index root, diff and carry stages, and its spec."""
