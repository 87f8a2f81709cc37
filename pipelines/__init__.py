"""What composes an embedrank job: config, planning, storage I/O, commit protocol, Ray graphs, CLI.

Nothing here imports torch or transformers; model code lives in `actors`.
"""

__version__ = "0.1.0"
