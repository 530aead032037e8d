"""slimtune's own error types (each also a built-in type, so ``except ValueError`` keeps working)."""

from __future__ import annotations


class NotMergeableError(RuntimeError):
    """Raised when asked to merge a method or base layer that cannot absorb the adapter."""
