"""Optional, heavy dependencies imported on first use, so a run that does not need them never pays for them.

``datasets`` (with pyarrow and pandas), TensorBoard's writer, W&B and matplotlib together add about 150 MB
of resident memory and a second of start-up to every ``slimtune train`` that imports them at module level.
A module that may use one declares it at the top, visibly::

    datasets = OptionalModule("datasets", "pip install datasets")

``bool(datasets)`` says whether it is installed without importing it; the first attribute access imports
it (an ``ImportError`` then names the install command). Tests may replace such a name with ``None`` (as if
not installed) or with a stand-in object: callers test it with ``if not datasets``.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any


class OptionalModule:
    """A module imported when first used; falsy when it is not installed."""

    def __init__(self, name: str, install: str, needs: str | None = None) -> None:
        self._name = name
        self._needs = needs or name  # the package whose presence decides (torch.utils.tensorboard needs tensorboard)
        self._install = install
        self._module: ModuleType | None = None

    def __bool__(self) -> bool:
        if self._module is not None:
            return True
        try:
            return importlib.util.find_spec(self._needs) is not None
        except (ImportError, ValueError):  # a parent package missing, or a broken install
            return False

    def load(self) -> ModuleType:
        """The module itself (imported now if it was not yet)."""
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ImportError as error:
                raise ImportError(f"{self._name} is not installed: {self._install}") from error
        return self._module

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(self.load(), attribute)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"OptionalModule({self._name!r}, {state})"
