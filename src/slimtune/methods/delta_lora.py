"""Delta-LoRA: the frozen weight follows the change of the low-rank product.

Zi et al., "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices",
arXiv:2309.02411.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from slimtune.config import LoraConfig, MethodConfig
from slimtune.core.modules import is_dense_linear
from slimtune.core.state import AdapterState
from slimtune.methods.contract import tuner_layers
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lora import LoraMethod
from slimtune.methods.lora_layers import LoraLinear


@dataclass
class DeltaLoraConfig(LoraConfig):
    """Delta-LoRA: LoRA whose base weight also moves, after every optimizer step t > ``delta_start_step``:
    ``W ← W + λ · s · (B_{t+1} A_{t+1} − B_t A_t)``; W itself gets no gradient nor optimizer state.

    ``delta_lambda`` is the paper's update ratio λ (0.5) and ``delta_start_step`` its warm-up K (500
    steps of plain LoRA first). The paper drops dropout on the LoRA path, so ``lora_dropout`` must be 0.
    The trainer runs the W update after every optimizer step; in your own loop call
    ``slimtune.after_optimizer_step(model)`` after ``optimizer.step()``.

    Saved as a plain PEFT LoRA adapter of rank 2r that holds the whole change relative to the
    original base: ``ΔW = (1 + λ) s B A − λ s B_K A_K`` (the updates telescope), so PEFT and slimtune
    reproduce the trained model from the untouched base.
    """

    peft_type: ClassVar[str] = "DELTA_LORA"

    delta_lambda: float = 0.5
    delta_start_step: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_parameters:
            raise ValueError(f"target_parameters={self.target_parameters}: Delta-LoRA adapts linear layers only; use "
                             "LoraConfig for parameters (and target_modules here).")
        if self.lora_dropout:
            raise ValueError(f"DeltaLoraConfig(lora_dropout={self.lora_dropout!r}): Delta-LoRA runs without "
                             "dropout on the LoRA path (the W update assumes B A is the model's own update); "
                             "set lora_dropout=0.")
        if self.use_dora:
            raise ValueError("DeltaLoraConfig(use_dora=True) contradicts itself: DoRA renormalises W + sBA per row "
                             "while Delta-LoRA moves W by sBA's change; use one or the other.")
        lam = self.delta_lambda
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not 0 <= lam < math.inf:
            raise ValueError(f"delta_lambda={self.delta_lambda!r} must be a number ≥ 0 (the paper uses 0.5).")
        if not isinstance(self.delta_start_step, int) or self.delta_start_step < 0:
            raise ValueError(f"delta_start_step={self.delta_start_step!r} must be an integer ≥ 0 "
                             "(the paper uses 500).")


class DeltaState(nn.Module):
    """Per adapter: B_t, A_t from the last step, B_K, A_K from just before the first W update, and the number
    of steps taken (a tensor, so a checkpoint restores it in place with the rest). On a bf16/fp16 W, also the
    part of the updates W's rounding has not taken yet (``compensation``, in W's dtype: Kahan summation), since
    one step's change is mostly below half a bf16 unit of W and would be lost (60% of it in 60 steps at lr 2e-4)."""

    prev_A: torch.Tensor
    prev_B: torch.Tensor
    start_A: torch.Tensor
    start_B: torch.Tensor
    steps: torch.Tensor
    compensation: torch.Tensor | None

    def __init__(self, A: torch.Tensor, B: torch.Tensor, delta_lambda: float, start_step: int,
                 weight: torch.Tensor) -> None:
        super().__init__()
        # persistent: a checkpoint of the whole model (transformers' Trainer saves model.state_dict()) carries them
        for name, value in (("prev_A", A), ("prev_B", B), ("start_A", A), ("start_B", B)):
            self.register_buffer(name, value.detach().clone())
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=A.device))
        self.register_buffer("compensation", torch.zeros_like(weight) if needs_compensation(weight) else None)
        self.delta_lambda, self.start_step = delta_lambda, start_step

    def tensors(self) -> dict[str, torch.Tensor]:
        """What training changes here, by name (see :meth:`DeltaLoraMethod.checkpoint_tensors`)."""
        out = {"prev_A": self.prev_A, "prev_B": self.prev_B, "start_A": self.start_A, "start_B": self.start_B,
               "steps": self.steps}
        return out if self.compensation is None else {**out, "compensation": self.compensation}


def needs_compensation(weight: torch.Tensor) -> bool:
    """Whether small updates of ``weight`` need a running record of their rounding error (narrower than fp32)."""
    return torch.finfo(weight.dtype).bits < 32


@torch.no_grad()
def compensated_add_(weight: torch.Tensor, delta: torch.Tensor, compensation: torch.Tensor | None) -> None:
    """``weight += delta`` where ``weight + compensation`` is the exact sum so far: W takes the rounded sum and
    ``compensation`` keeps what rounding left out (in fp32 arithmetic), so no update is lost, however small."""
    if compensation is None:
        weight.add_(delta.to(weight.dtype))
        return
    exact = weight.float() + compensation.float() + delta.float()
    weight.copy_(exact)
    compensation.copy_(exact - weight.float())


class DeltaLoraLinear(LoraLinear):
    """Delta-LoRA on a linear layer: ``h = W_t x + b + s · B A x`` (no dropout), and after step t:
    ``W_{t+1} = W_t + λ · s · (B_{t+1} A_{t+1} − B_t A_t)`` (one rank-2r matmul, no full-size copy kept).

    Plain LoRA adapters can share this layer. Deleting a Delta-LoRA adapter takes its updates back
    out of W; ``slimtune.unload`` keeps them (W then holds ``λ s (B A − B_K A_K)``).
    """

    adapter_values = LoraLinear.adapter_values + ("delta_state",)

    def low_rank_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A Delta-LoRA adapter also moved W, so ``B A`` is not its whole change (see :meth:`adapter_tensors`)."""
        return None if adapter_name in self.delta_state else super().low_rank_factors(adapter_name)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.delta_state = nn.ModuleDict()

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        super().add_adapter(adapter_name, config, module_name)
        if isinstance(config, DeltaLoraConfig):
            A, B = self.lora_parameters(adapter_name)
            self.delta_state[adapter_name] = DeltaState(A, B, config.delta_lambda, config.delta_start_step,
                                                        self.weight)

    def state_of(self, adapter_name: str) -> DeltaState:
        """The :class:`DeltaState` of a Delta-LoRA adapter of this layer."""
        return cast(DeltaState, self.delta_state[adapter_name])  # add_adapter stores one per Delta-LoRA adapter

    @torch.no_grad()
    def delta_update(self, adapter_name: str) -> None:
        """After an optimizer step: move W by ``λ s (B A − B_prev A_prev)`` once past the start step."""
        state = self.state_of(adapter_name)
        A, B = self.lora_parameters(adapter_name)
        state.steps.add_(1)
        if int(state.steps) <= state.start_step:  # the reference B_K A_K follows until the first update
            state.start_A.copy_(A)
            state.start_B.copy_(B)
        elif adapter_name not in self.merged_adapters:
            BB, AA = torch.cat([B, -state.prev_B], 1), torch.cat([A, state.prev_A])  # B A − B_t A_t as one product
            self._add_to_weight(adapter_name, BB, AA, state.delta_lambda)
        state.prev_A.copy_(A)
        state.prev_B.copy_(B)

    def _add_to_weight(self, adapter_name: str, B: torch.Tensor, A: torch.Tensor, factor: float) -> None:
        """``W += factor · s · B A`` in W's layout; B (out, k), A (k, in). A bf16/fp16 W gets the update with
        the rounding error of the earlier ones (see :class:`DeltaState`)."""
        state, weight = self.state_of(adapter_name), self.weight
        wide = torch.promote_types(B.dtype, torch.float32)  # bf16 factors (a model cast whole): an exact product
        delta = B.to(wide) @ A.to(wide) * (factor * self.scaling[adapter_name])
        delta = delta.T if self.fan_in_fan_out else delta
        if state.compensation is None and needs_compensation(weight):  # W was cast after add_adapter
            state.compensation = torch.zeros_like(weight)
        compensated_add_(weight, delta, state.compensation)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Delta-LoRA adapters export the rank-2r LoRA ``[(1+λ)B, −λB_K] [A; A_K]`` (not live tensors)."""
        if adapter_name not in self.delta_state:
            return super().adapter_tensors(adapter_name)
        state = self.state_of(adapter_name)
        # W holds λ s (B A − B_K A_K) only once updated; before (or if after_optimizer_step never ran, as in a loop
        # that does not call it) the model is W₀ + s B A, and the export must say so
        lam = state.delta_lambda if int(state.steps) > state.start_step else 0.0
        A, B = self.lora_parameters(adapter_name)
        return {"lora_A.weight": torch.cat([A, state.start_A]).detach(),
                "lora_B.weight": torch.cat([(1 + lam) * B, -lam * state.start_B], 1).detach()}

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.delta_state and adapter_name not in self.merged_adapters:
            state = self.state_of(adapter_name)
            if int(state.steps) > state.start_step:  # take the updates back out of W
                with torch.no_grad():
                    A, B = self.lora_parameters(adapter_name)
                    self._add_to_weight(adapter_name, torch.cat([B, -state.start_B], 1),
                                        torch.cat([A, state.start_A]), -state.delta_lambda)
        super().delete_adapter(adapter_name)


class DeltaLoraMethod(LoraMethod):
    peft_type: ClassVar[str] = "DELTA_LORA"
    config_class: ClassVar[type[MethodConfig]] = DeltaLoraConfig
    layer_types: ClassVar[tuple[type[TunerLayer], ...]] = (DeltaLoraLinear,)
    changes_base_weights: ClassVar[bool] = True

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        if not is_dense_linear(base) or not base.weight.is_floating_point():
            raise TypeError(f"Delta-LoRA updates the base weight, so it needs a floating-point linear layer, not a "
                            f"{type(base).__name__}; pick nn.Linear / Conv1D target_modules (not quantized ones).")
        return DeltaLoraLinear(base)

    def after_optimizer_step(self, model: nn.Module, adapter_name: str, state: AdapterState) -> None:
        """Apply the W update of this adapter; runs once after every optimizer step."""
        for _, layer in tuner_layers(model):
            if isinstance(layer, DeltaLoraLinear) and adapter_name in layer.delta_state:
                layer.delta_update(adapter_name)

    def checkpoint_tensors(self, model: nn.Module, adapter_name: str, state: AdapterState) -> dict[str, torch.Tensor]:
        """Each layer's base weight W (moved in place by every update) and its :class:`DeltaState`."""
        out = {}
        for name, layer in tuner_layers(model):
            if isinstance(layer, DeltaLoraLinear) and adapter_name in layer.delta_state:
                out[f"{name}.base_layer.weight"] = layer.weight  # the base layer's own tensor
                out.update({f"{name}.delta_state.{k}": v for k, v in layer.state_of(adapter_name).tensors().items()})
        return out

    def saved_config(self, config: MethodConfig) -> dict[str, Any]:
        """The rank-2r LoRA config of the exported adapter (every scaling s kept)."""
        assert isinstance(config, DeltaLoraConfig)
        factor = math.sqrt(2) if config.use_rslora else 2  # alpha/r (or alpha/√r) unchanged with r → 2r
        data = {k: v for k, v in config.to_dict().items() if k not in ("delta_lambda", "delta_start_step")}
        data.update(peft_type="LORA", r=2 * config.r, lora_alpha=factor * config.lora_alpha,
                    rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                    alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()})
        return data
