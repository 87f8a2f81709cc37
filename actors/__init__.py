"""Ray-free building blocks used by the embedrank pipelines."""
