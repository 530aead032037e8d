"""LoRA on parameters (PEFT's ``target_parameters``): low-rank updates of weights that no linear layer holds, such as a
mixture of experts' fused expert stacks (``experts.gate_up_proj`` of shape ``(experts, out, in)``).

Each expert ``e`` gets its own rank-``r`` update: ``W_e' = W_e + s · B_e A_e``. As in PEFT, one adapter's factors
for a parameter are two matrices, ``A: (r · experts, in)`` (rows expert-major: row ``e·r + k``) and
``B: (out, r · experts)`` (columns rank-major: column ``k·experts + e``); a 2-D parameter ``(out, in)`` is one expert.
The module holding the parameters runs unchanged on the updated weights (``torch.func.functional_call``), so any
experts implementation (loops, grouped matmuls) trains through them. Dropout and DoRA need the layer's input and
cannot apply (refused by the config).

On disk the keys are PEFT's, whose wrappers nest one per parameter in the order the module registers them: with two
adapted parameters on ``mlp.experts``, the first one's factors are ``mlp.experts.base_layer.lora_A.weight`` and the
second one's ``mlp.experts.lora_A.weight``. In memory one :class:`LoraParameters` holds them all, keyed by adapter and
parameter name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call

from slimtune.config import LoraConfig
from slimtune.errors import NotMergeableError
from slimtune.methods.layers import TunerLayer, check_finite_merge, widened_copy
from slimtune.methods.lora_layers import lora_scaling
from slimtune.methods.targets import pattern_value


def parameter_geometry(param: torch.Tensor, owner: nn.Module) -> tuple[int, int, int, bool]:
    """``(experts, in, out, in_first)`` of a weight LoRA can adapt: ``(out, in)`` is one expert; ``(experts, out, in)``
    is the layout of nn.Linear weights stacked, ``(experts, in, out)`` that of modules marking ``is_transposed``
    (PEFT's rule), which ``in_first`` says."""
    if param.ndim == 2:
        return 1, param.shape[1], param.shape[0], False
    if param.ndim == 3:
        if getattr(owner, "is_transposed", False):
            return param.shape[0], param.shape[1], param.shape[2], True
        return param.shape[0], param.shape[2], param.shape[1], False
    raise ValueError(f"target_parameters: a {param.ndim}-D parameter {tuple(param.shape)} cannot take LoRA; 2-D "
                     "(out, in) and 3-D (experts, out, in) weights can.")


class LoraParameters(TunerLayer):
    """LoRA on one module's parameters: ``W_e' = W_e + s · B_e A_e`` for each adapted weight, expert by expert
    (PEFT's ``ParamWrapper``; Hu et al., arXiv:2106.09685)."""

    adapter_attrs = ("lora_A", "lora_B")
    adapter_values = ("scaling",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()  # adapter → parameter name → nn.Linear(in, r · experts)
        self.lora_B = nn.ModuleDict()  # adapter → parameter name → nn.Linear(r · experts, out)
        self.scaling: dict[str, dict[str, float]] = {}

    def parameter_names(self) -> list[str]:
        """The base module's own parameters, in the order it registers them (PEFT's nesting order)."""
        return [name for name, _ in self.base_layer.named_parameters(recurse=False)]

    def adapted_parameters(self, adapter_name: str | None = None) -> list[str]:
        """The parameters ``adapter_name`` adapts here (None: any adapter), in registration order."""
        held = {p for a, per in self.lora_A.items() if adapter_name in (None, a) for p in cast(nn.ModuleDict, per)}
        return [p for p in self.parameter_names() if p in held]

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        names = matching_parameters(module_name, self.parameter_names(), config.target_parameters or [])
        device = self.adapter_device()
        a_layers: dict[str, nn.Linear] = {}
        b_layers: dict[str, nn.Linear] = {}
        self.scaling[adapter_name] = {}
        init = config.init_lora_weights  # (A: nn.Linear's Kaiming-uniform, as PEFT; False: B too, non-zero)
        for name in names:
            param = getattr(self.base_layer, name)
            experts, d_in, d_out, _ = parameter_geometry(param, self.base_layer)
            key = f"{module_name}.{name}"  # rank_pattern / alpha_pattern keys match it, as in PEFT
            r = pattern_value(config.rank_pattern, key, config.r)
            alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
            dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
            a_layers[name] = nn.Linear(d_in, r * experts, bias=False, device=device, dtype=dtype)
            b_layers[name] = nn.Linear(r * experts, d_out, bias=False, device=device, dtype=dtype)
            self.scaling[adapter_name][name] = lora_scaling(alpha, r, config.use_rslora)
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(a_layers[name].weight, std=1.0 / r)
                if init is not False:
                    nn.init.zeros_(b_layers[name].weight)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = nn.ModuleDict(a_layers), nn.ModuleDict(b_layers)
        self.active_adapters.append(adapter_name)

    def factors(self, adapter_name: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` with ``left @ right = B_e A_e`` per expert, batched:
        ``(experts, out, r) @ (experts, r, in)``, or transposed for an ``(experts, in, out)`` weight."""
        A = cast(nn.Linear, cast(nn.ModuleDict, self.lora_A[adapter_name])[name]).weight
        B = cast(nn.Linear, cast(nn.ModuleDict, self.lora_B[adapter_name])[name]).weight
        experts, _, _, in_first = parameter_geometry(getattr(self.base_layer, name), self.base_layer)
        a = A.reshape(experts, -1, A.shape[-1])  # (experts, r, in)
        b = B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)  # (experts, out, r)
        return (a.transpose(1, 2), b.transpose(1, 2)) if in_first else (b, a)

    def parameter_delta(self, adapter_name: str, name: str) -> torch.Tensor:
        """``s · B A`` per expert, in the parameter's own shape and layout."""
        left, right = self.factors(adapter_name, name)
        weight = getattr(self.base_layer, name)
        return (torch.bmm(left, right) * self.scaling[adapter_name][name]).reshape(weight.shape)

    def adapted_weight(self, name: str, adapter_names: Sequence[str]) -> torch.Tensor:
        """The weight with these adapters' updates added (one ``baddbmm`` for one adapter of the weight's dtype), in
        the weight's dtype: autocast would round the whole stack to its dtype (as PEFT, it is switched off here)."""
        weight = getattr(self.base_layer, name)
        with torch.autocast(weight.device.type, enabled=False):
            return self._added(weight, name, adapter_names)

    def _added(self, weight: torch.Tensor, name: str, adapter_names: Sequence[str]) -> torch.Tensor:
        out = weight
        for adapter_name in adapter_names:
            left, right = self.factors(adapter_name, name)
            if left.dtype == weight.dtype:
                batched = out.reshape(left.shape[0], left.shape[1], right.shape[2])
                out = torch.baddbmm(batched, left, right, alpha=self.scaling[adapter_name][name]).reshape(weight.shape)
            else:
                out = out + self.parameter_delta(adapter_name, name).to(weight.dtype)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = self.unmerged_active()
        adapters = {name: [a for a in active if self.holds(a, name)] for name in self.adapted_parameters()}
        weights = {name: self.adapted_weight(name, held) for name, held in adapters.items() if held}
        if not weights:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, weights, args, kwargs, tie_weights=False, strict=False)

    def holds(self, adapter_name: str, name: str) -> bool:
        return adapter_name in self.lora_A and name in cast(nn.ModuleDict, self.lora_A[adapter_name])

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """PEFT's keys: one nested wrapper per parameter, the first registered innermost."""
        mine = self.adapted_parameters(adapter_name)
        out = {}
        for depth, name in enumerate(reversed(mine)):
            prefix = "base_layer." * depth
            for attr in self.adapter_attrs:
                out[f"{prefix}{attr}.weight"] = cast(nn.Linear, getattr(self, attr)[adapter_name][name]).weight
        return out

    # ---- merging (every adapted parameter in place, all checked before any is written) -------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotMergeableError(f"{type(self.base_layer).__name__}'s LoRA changes several parameters; merge it with "
                                "slimtune.merge_adapter (each parameter gets its own update).")

    def check_mergeable(self) -> None:  # (every adapted parameter is a floating-point weight: checked when added)
        pass

    def _merge(self, names: list[str], check_only: bool) -> None:
        if names:
            self._rewrite({p: [a for a in names if self.holds(a, p)] for p in self.adapted_parameters()}, 1.0,
                          check_only)
            if not check_only:
                self.merged_adapters += names

    def unmerge(self) -> None:
        names, self.merged_adapters = self.merged_adapters, []
        self._rewrite({p: [a for a in names if self.holds(a, p)] for p in self.adapted_parameters()}, -1.0, False)

    def _rewrite(self, updates: dict[str, list[str]], sign: float, check_only: bool) -> None:
        new = {}
        with torch.no_grad():
            for name, adapters in updates.items():
                if not adapters:
                    continue
                weight = getattr(self.base_layer, name)
                merged = widened_copy(weight)
                for adapter_name in adapters:
                    merged.add_(self.parameter_delta(adapter_name, name), alpha=sign)
                    check_finite_merge(merged, adapter_name)
                new[name] = merged.to(weight.dtype)
                check_finite_merge(new[name], adapters[-1])
            if not check_only:
                for name, value in new.items():
                    getattr(self.base_layer, name).copy_(value)

    def extra_repr(self) -> str:
        return "parameters=" + str({a: list(cast(nn.ModuleDict, per)) for a, per in self.lora_A.items()})


def matching_parameters(module_name: str, parameter_names: Iterable[str], targets: Sequence[str]) -> list[str]:
    """The module's parameters ``targets`` name: ``<module>.<parameter>`` equal to an entry or ending in ``.<entry>``
    (PEFT's rule)."""
    return [p for p in parameter_names
            if any(f"{module_name}.{p}" == t or f"{module_name}.{p}".endswith("." + t) for t in targets)]


PARAMETER_INITS = (True, False, "gaussian")


def parameter_keys(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """``<module>.<parameter>`` of every parameter ``targets`` names (what rank_pattern / alpha_pattern keys match)."""
    return [f"{name}.{p}" for name, module in model.named_modules()
            for p in matching_parameters(name, [n for n, _ in module.named_parameters(recurse=False)], targets)]


def parameter_targets(model: nn.Module, targets: Sequence[str], inside: set[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module whose own parameters ``targets`` names (a :class:`LoraParameters` counts
    as its base), outside ``inside`` (other wrappers' insides, head copies). Raises for what LoRA cannot adapt."""
    found = []
    for name, module in model.named_modules():
        if name in inside or any(name.startswith(s + ".") for s in inside):
            continue
        base = module.base_layer if isinstance(module, LoraParameters) else module
        picked = matching_parameters(name, [n for n, _ in base.named_parameters(recurse=False)], targets)
        if not picked:
            continue
        if not name:
            raise ValueError(f"target_parameters {picked} are the model's own parameters; LoRA adapts parameters of "
                             "its submodules (e.g. 'experts.gate_up_proj').")
        if isinstance(module, TunerLayer) and not isinstance(module, LoraParameters):
            raise ValueError(f"target_parameters {picked} belong to {name}, which already holds a "
                             f"{type(module).__name__} (target_modules): a layer is adapted as a module or through its "
                             "parameters, not both. Leave it out of one of the two lists.")
        for p in picked:
            param = getattr(base, p)
            if not param.is_floating_point():
                raise ValueError(f"target_parameters: {name}.{p} is {param.dtype} (quantized?); LoRA adapts "
                                 "floating-point weights.")
            parameter_geometry(param, base)
        found.append((name, module))
    return found

