"""A bottleneck adapter started from a saved folder (``BottleneckConfig.init_from``): AdapterHub's format or
slimtune's. Everything is checked before the model changes (:func:`check_initial`, from the method's
``check``); the copy (:func:`load_initial`, from its ``add``) then cannot fail halfway.

Keys are compared in the folder's own naming: AdapterHub's (``<site>.adapters.<name>.<parameter>``) or
slimtune's on-disk keys (``base_model.model.<module>.<parameter>``). Only safetensors files are read: a
recipe has no flag to trust a pickle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from slimtune.adapterhub import format as hubformat
from slimtune.adapterhub.modules import AdapterOptions, BottleneckAdapter
from slimtune.adapterhub.sites import Site, align, hub_tensors
from slimtune.methods.contract import PEFT_PREFIX, tuner_layers

PROBE = "_"  # the adapter's name while checking (it has none yet)


def adapter_shapes(sites: list[tuple[Site, int]], d: int, options: AdapterOptions, name: str, hub_keys: bool
                   ) -> dict[str, torch.Size]:
    """The tensors a new AdapterHub-placed adapter will have at ``sites`` (site, bottleneck size), by key."""
    probe_options = dataclasses.replace(options, init_weights_seed=None)  # no reseeding while only measuring
    out = {}
    for site, m in sites:
        probe = BottleneckAdapter(d, m, probe_options, device=torch.device("meta"))
        for key, tensor in probe.state_dict().items():
            full = f"{site.hub_path}.adapters.{name}.{key}" if hub_keys else f"{PEFT_PREFIX}{site.name}.adapters.{key}"
            out[full] = tensor.shape
    return out


def is_hub_folder(folder: Path) -> bool:
    return hubformat.folder_kind(folder) == "adapterhub"


def stored_tensors(model: nn.Module, folder: Path, name: str, expected: set[str]) -> dict[str, torch.Tensor]:
    """``init_from``'s tensors, keyed as the new adapter ``name``'s will be (see the module docstring)."""
    where = f"init_from={str(folder)!r}"
    hub = is_hub_folder(folder)
    try:
        stored = hubformat.read_weights(folder, hubformat.ADAPTER_WEIGHTS if hub else hubformat.PEFT_WEIGHTS,
                                        allow_pickle=False)
    except ValueError as error:
        if "pickle" not in str(error):
            raise
        raise ValueError(f"{where} reads safetensors only: {error} (or load it with slimtune.adapterhub."
                         "load_adapterhub(model, path, allow_pickle=True) and save it again with save_adapterhub, "
                         "which writes safetensors).") from error
    assert stored is not None  # read_weights raises when neither file is there
    if hub:
        saved = str(hubformat.read_hub_config(folder).get("name") or name)
        return align(stored, expected, model, saved, name, "adapters")
    return {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in stored.items()}


def check_initial(model: nn.Module, folder: Path, shapes: dict[str, torch.Size]) -> None:
    """Raise unless ``init_from`` holds exactly ``shapes`` (computed with the name :data:`PROBE`)."""
    stored = stored_tensors(model, folder, PROBE, set(shapes))
    hubformat.check_matching(shapes, stored, f"init_from={str(folder)!r}")


def load_initial(model: nn.Module, folder: Path, name: str) -> None:
    """Copy ``init_from``'s tensors into the adapter ``name`` just added."""
    if is_hub_folder(folder):
        live = hub_tensors(model, name, name)
    else:
        live = {f"{PEFT_PREFIX}{module}.{k}": v for module, layer in tuner_layers(model)
                if name in layer.adapter_names for k, v in layer.adapter_tensors(name).items()}
    hubformat.copy_checked(live, stored_tensors(model, folder, name, set(live)), f"init_from={str(folder)!r}")
