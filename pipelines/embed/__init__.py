"""The embedding job: its config, its CPU stage and its spec."""
