"""AdapterHub (the ``adapters`` library), both ways: its saved bottleneck adapters, heads and AdapterFusion
layers read and written, its adapter placements computed on slimtune's own layers, and its composition
blocks.

    from slimtune.adapterhub import Fuse, Parallel, Stack, load_adapterhub, save_adapterhub, set_composition
    load_adapterhub(model, "hub/a"); load_adapterhub(model, "hub/b")     # folders adapters' save_adapter wrote
    set_composition(model, Stack("a", "b"))                                # or Parallel("a", "b"), Fuse("a", "b")
    save_adapterhub(model, "out/a", "a")      # adapters: model.load_adapter("out/a", use_safetensors=True)

New adapters in AdapterHub's placement: ``slimtune.BottleneckConfig(placement="adapterhub", adapter_type=
"pfeiffer")`` (seq_bn; "houlsby" = double_seq_bn, "parallel" = par_bn). Fusion layers:
``slimtune.AdapterFusionConfig(adapter_names=["a", "b"])``. The names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The method registry first: it imports this package's lower modules (blocks, layers, sites, format), which
# import slimtune.methods.layers; entering through them before the registry would close an import cycle.
import slimtune.methods  # noqa: F401

_EXPORTS = {
    "load_adapterhub": "slimtune.adapterhub.files",
    "save_adapterhub": "slimtune.adapterhub.files",
    "set_composition": "slimtune.adapterhub.composition",
    "get_composition": "slimtune.adapterhub.composition",
    "Stack": "slimtune.adapterhub.blocks",
    "Parallel": "slimtune.adapterhub.blocks",
    "Fuse": "slimtune.adapterhub.blocks",
    "folder_kind": "slimtune.adapterhub.format",
    "fusion_regularization_loss": "slimtune.methods.fusion",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: slimtune.methods imports this package's lower modules (blocks, layers, sites), so importing the
    # upper ones (files, composition, which import slimtune.lifecycle) here would make an import cycle.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimtune.adapterhub' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers see (the "as" marks a re-export)
    from slimtune.adapterhub.blocks import Fuse as Fuse
    from slimtune.adapterhub.blocks import Parallel as Parallel
    from slimtune.adapterhub.blocks import Stack as Stack
    from slimtune.adapterhub.composition import get_composition as get_composition
    from slimtune.adapterhub.composition import set_composition as set_composition
    from slimtune.adapterhub.files import load_adapterhub as load_adapterhub
    from slimtune.adapterhub.files import save_adapterhub as save_adapterhub
    from slimtune.adapterhub.format import folder_kind as folder_kind
    from slimtune.methods.fusion import fusion_regularization_loss as fusion_regularization_loss
