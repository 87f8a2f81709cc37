"""Errors a user can cause and fix; the CLI prints their message, never a traceback."""


class EmbedrankError(Exception):
    """Base of every error reported to the user as a plain message."""

    exit_code = 2
    """The CLI's exit status: 2 for a mistake to fix; subclasses for failures where a rerun resumes."""


class InputError(EmbedrankError):
    """The corpus cannot be read as configured (missing file/column, unreadable shard)."""


class InputChanged(InputError):
    """An input file is not the version the job's plan recorded (its size or ETag/mtime differ): it was rewritten
    since planning. A store-side change, never a reason to reject rows; a rerun plans again."""


class OutputError(EmbedrankError):
    """The output root refuses this job (fingerprint mismatch, foreign files, lock held)."""


class ModelLoadError(EmbedrankError):
    """The model cannot be loaded or does not fit the config."""


class DeviceMemoryError(EmbedrankError):
    """One sequence alone does not fit in the device's memory (lower `model.max_length`)."""


class LockLost(OutputError):
    """This driver no longer holds its output's lock: another job took it over while this one was paused or cut
    off (VM suspend, long GC pause, partition), or its heartbeat could not be renewed. The driver stops before
    its next commit, delete or index pointer write; what it committed is kept. CLI exit status 4."""

    exit_code = 4


class ResourceError(EmbedrankError):
    """The compute settings ask for what no node of the Ray cluster can ever offer (a GPU on a machine without
    one, more CPUs than a node has, a replica that leaves no CPU for the I/O tasks); refused before any work."""
