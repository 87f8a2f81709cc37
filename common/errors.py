"""Errors a user can cause and fix; the CLI prints their message, never a traceback."""


class EmbedrankError(Exception):
    """Base of every error reported to the user as a plain message."""

    exit_code = 2
    """The CLI's exit status: 2 for a mistake to fix; subclasses for failures where a rerun resumes."""


class InputError(EmbedrankError):
    """The corpus cannot be read as configured (missing file/column, unreadable shard)."""


class OutputError(EmbedrankError):
    """The output root refuses this job (fingerprint mismatch, foreign files, lock held)."""


class ModelLoadError(EmbedrankError):
    """The model cannot be loaded or does not fit the config."""


class DeviceMemoryError(EmbedrankError):
    """One sequence alone does not fit in the device's memory (lower `model.max_length`)."""
