"""Method registry: how each ``peft_type`` wraps a target module.

A layer-wrapping method registers ``make_layer(base_module, config) -> TunerLayer`` (an empty
wrapper; the injector then calls ``add_adapter``). Methods that do not wrap layers (prompt tuning, sparse
fine-tuning) instead give their config an ``inject_into(model, adapter_name)`` method.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from slimtune.config import MethodConfig
from slimtune.methods.base import ModulesToSave, NotMergeableError, TunerLayer
from slimtune.methods.lora import LoraEmbedding, LoraLinear, make_lora_layer

LayerFactory = Callable[[nn.Module, MethodConfig], TunerLayer]

_LAYER_FACTORIES: dict[str, tuple[LayerFactory, tuple[type[TunerLayer], ...]]] = {}


def register_method(peft_type: str, make_layer: LayerFactory, layer_types: tuple[type[TunerLayer], ...]) -> None:
    """Register a layer-wrapping method: its factory and the TunerLayer classes it produces."""
    _LAYER_FACTORIES[peft_type] = (make_layer, layer_types)


def layer_factory(peft_type: str) -> tuple[LayerFactory, tuple[type[TunerLayer], ...]]:
    if peft_type not in _LAYER_FACTORIES:
        raise ValueError(f"no layer-wrapping method registered for peft_type={peft_type!r}; "
                         f"known: {sorted(_LAYER_FACTORIES)}.")
    return _LAYER_FACTORIES[peft_type]


register_method("LORA", make_lora_layer, (LoraLinear, LoraEmbedding))

# Bottleneck adapters, (IA)³, prompt/prefix methods, sparse methods: imported here so their configs are
# registered (for config_from_dict and recipes) whenever slimtune.methods is.
from slimtune.methods import prefix, prompt_tuning, prompts, sparse  # noqa: E402,F401
from slimtune.methods.adapter import BottleneckLinear, make_bottleneck_layer  # noqa: E402
from slimtune.methods.ia3 import IA3Linear, make_ia3_layer  # noqa: E402

register_method("IA3", make_ia3_layer, (IA3Linear,))
register_method("BOTTLENECK", make_bottleneck_layer, (BottleneckLinear,))

__all__ = [
    "LoraEmbedding",
    "LoraLinear",
    "ModulesToSave",
    "NotMergeableError",
    "TunerLayer",
    "layer_factory",
    "register_method",
]
