"""slimtune's own error types (each also a built-in type, so ``except ValueError`` keeps working).

Every error slimtune raises about a user's input or the file system derives from :class:`SlimtuneError`,
and says what was wrong (the file, the key or value), and how to go on.
"""

from __future__ import annotations

import os


class SlimtuneError(Exception):
    """Base of slimtune's own errors."""


class NotMergeableError(SlimtuneError, RuntimeError):
    """Raised when asked to merge a method or base layer that cannot absorb the adapter."""


class InvalidFileError(SlimtuneError, ValueError):
    """A file slimtune reads (an adapter, a checkpoint, a safetensors file) is malformed, damaged, or does not
    fit what it is loaded into. The message starts with the file and names the bad key or value; ``path``
    and ``key`` hold them."""

    def __init__(self, path: str | os.PathLike, message: str, key: str | None = None) -> None:
        self.path, self.key = os.fspath(path), key
        super().__init__(f"{self.path}: {message}")


class DataError(SlimtuneError, ValueError):
    """A training or evaluation data set cannot be read: the message names the file (or row) and the field."""


class SaveError(SlimtuneError, OSError):
    """Writing a file or folder failed (disk full, read-only, permissions). What was there before is intact."""


class TrainingDivergedError(SlimtuneError, ArithmeticError):
    """The loss or the trained weights became inf/NaN: the run stops before anything non-finite is saved."""


class RunFolderBusyError(SlimtuneError, OSError):
    """Another `slimtune train` holds the run folder (see :class:`slimtune.train.run_folder.RunLock`)."""
