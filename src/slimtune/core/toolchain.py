"""The C++ compiler on this machine: torch.compile's CPU code and slimtune's CPU decode kernel need one."""

from __future__ import annotations

import os
import shutil

__all__ = ["cpu_compiler"]


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU code would use (``$CXX``, else g++), or None when there is none."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)
