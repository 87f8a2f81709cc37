"""What runs inside one model replica: tokenisation, batching, pooling, prompts, the replica classes.

Plain Python and torch: never imports ray or `pipelines` (a test parses every import), so every replica
is unit-testable without Ray. What it shares with the jobs (errors, failpoints, column names, the model
cache) comes from `common`.
"""
