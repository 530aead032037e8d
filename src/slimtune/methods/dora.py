"""DoRA: weight-decomposed low-rank adaptation, selected with ``LoraConfig(use_dora=True)`` as in PEFT.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from slimtune.config import LoraConfig
from slimtune.core.modules import dense_weight
from slimtune.methods.lora_layers import LoraLinear


class DoraLinear(LoraLinear):
    """DoRA on a linear layer: ``h = m ⊙ (W x + s B A dropout(x)) / ‖W + s B A‖_row + b``.

    The weight is split into a magnitude ``m`` (size out, initialised to ``‖W + s B A‖_row``, i.e.
    ``‖W‖_row`` for the default B = 0) and a direction ``(W + s B A) / ‖W + s B A‖_row``; the norm is a
    constant for backprop (paper §4.3), so m, A and B train and W stays frozen.

    - The norm never builds an ``(out, in)`` matrix: row-wise,
      ``‖W + sBA‖² = ‖W‖² + 2s·Σ B ⊙ (W Aᵀ) + s²·Σ B (A Aᵀ) ⊙ B``, where ``W Aᵀ`` is the base layer applied
      to the r rows of A (so 4-bit bases work
      unchanged) and ``‖W‖²_row`` is cached until the base weight changes.
    - Dropout touches only the LoRA branch, so training runs ONE base matmul even with dropout > 0
      (PEFT runs a second one on the dropped-out input); in eval mode the two agree exactly.
    - Adapters added here with ``use_dora=False`` are plain LoRA adapters.
    """

    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")
    fusable = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()
        self._merge_scale: dict[str, torch.Tensor] = {}  # m / ‖·‖ used when merging, kept to unmerge exactly
        self._w_norm2: tuple[tuple, torch.Tensor] | None = None  # (base version key, ‖W‖²_row)

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        super().add_adapter(adapter_name, config, module_name)
        if config.use_dora:
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(self.weight_norm(adapter_name))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dora = [n for n in self.unmerged_active() if n in self.lora_magnitude_vector]
        base, probes = self._base_and_probes(x, dora, *args, **kwargs)  # W x + b, and W Aᵀ for each DoRA norm
        bias = self.bias
        result = base
        for name in self.unmerged_active():
            (A, B), dropout = self.lora_modules(name), self.lora_dropout[name]
            lora = B(A(dropout(x.to(A.weight.dtype)))) * self.scaling[name]  # s B A x̃
            if name in probes:
                wx = (base if bias is None else base - bias).to(lora.dtype)  # W x
                g = self.lora_magnitude_vector[name] / self.weight_norm(name, probes[name])  # norm detached
                lora = g * (wx + lora) - wx  # DoRA's output minus the W x the base already gave
            result = result + lora.to(result.dtype)
        return result

    # ---- the norm -------------------------------------------------------------------------------
    def magnitude_scale(self, adapter_name: str) -> torch.Tensor:
        """``m / ‖W + s B A‖_row`` (size out); gradient flows to m only."""
        return self.lora_magnitude_vector[adapter_name] / self.weight_norm(adapter_name)

    @torch.no_grad()
    def weight_norm(self, adapter_name: str, wa: torch.Tensor | None = None) -> torch.Tensor:
        """``‖W + s B A‖`` per output row, from the current base weight (merged adapters included);
        ``wa = W Aᵀ`` (out, r) when the forward already has it."""
        A, B = self.lora_parameters(adapter_name)  # (r, in), (out, r)
        s = self.scaling[adapter_name]
        wa = self._base_matmul(A).T if wa is None else wa
        norm2 = self._base_row_norm2() + 2 * s * (B * wa).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
        return norm2.clamp_min(0).sqrt().clamp_min(torch.finfo(norm2.dtype).tiny)

    def _base_and_probes(self, x: torch.Tensor, names: list[str], *args, **kwargs):
        """The base output and ``W Aᵀ`` per named DoRA adapter from ONE base call on ``[x; A₁; A₂ …]``:
        the base weight is read once per forward, as for plain LoRA (a weight pass dominates on big models)."""
        if not names or args or kwargs:
            return self.base_layer(x, *args, **kwargs), {}
        flat = x.reshape(-1, x.shape[-1])
        rows = [self.lora_parameters(n)[0].detach().to(x.dtype) for n in names]
        out = self.base_layer(torch.cat([flat, *rows]))
        bias = self.bias
        probes, start = {}, flat.shape[0]
        for name, r in zip(names, rows):
            wa = out[start: start + r.shape[0]].detach().to(self.lora_parameters(name)[0].dtype)
            probes[name] = (wa if bias is None else wa - bias.to(wa.dtype)).T  # (out, r)
            start += r.shape[0]
        return out[: flat.shape[0]].reshape(*x.shape[:-1], out.shape[-1]), probes

    def _base_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows Wᵀ`` (bias excluded) through the base layer itself, whatever its storage."""
        weight = getattr(self.base_layer, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else rows.dtype
        out = self.base_layer(rows.to(dtype)).to(rows.dtype)
        bias = self.bias
        return out if bias is None else out - bias.to(out.dtype)

    def _base_row_norm2(self) -> torch.Tensor:
        tensors = itertools.chain(self.base_layer.parameters(), self.base_layer.buffers())
        key = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
        if self._w_norm2 is None or self._w_norm2[0] != key:
            w = dense_weight(self.base_layer).float()
            self._w_norm2 = (key, torch.linalg.vector_norm(w, dim=1).square())
        return self._w_norm2[1]

    def low_rank_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if adapter_name in self.lora_magnitude_vector else super().low_rank_factors(adapter_name)

    def mixed_batch_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """DoRA rows: ``g ⊙ (W x + s B A x)`` with ``g = m / ‖W + s B A‖``."""
        if adapter_name not in self.lora_magnitude_vector:
            return super().mixed_batch_factors(adapter_name)
        A, B = self.lora_parameters(adapter_name)
        return A, B * self.scaling[adapter_name], self.magnitude_scale(adapter_name)

    # ---- merging --------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """For DoRA ``g ⊙ (W + s B A) − W`` with ``g = m / ‖W + s B A‖`` on the current weight."""
        if adapter_name not in self.lora_magnitude_vector:
            return super().delta_weight(adapter_name)
        w = dense_weight(self.base_layer).float()
        g = self.magnitude_scale(adapter_name).detach()[:, None]
        lora = self.lora_product(adapter_name)
        delta = (g - 1) * w + g * lora
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, adapter_names: list[str] | None = None) -> None:
        for name in [a for a in (adapter_names or self.active_adapters) if a not in self.merged_adapters]:
            if name in self.lora_magnitude_vector:
                self._merge_scale[name] = self.magnitude_scale(name).detach()
            super().merge([name])

    def unmerge(self) -> None:
        """Undo merges last-first; a DoRA merge is undone with its kept scale: ``W = W' / g − s B A``."""
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            g = self._merge_scale.pop(name, None)
            weight = self.weight
            with torch.no_grad():
                if g is None:  # a plain LoRA adapter of this layer
                    weight.sub_(LoraLinear.delta_weight(self, name).to(weight.dtype))
                else:
                    w = weight.T if self.fan_in_fan_out else weight  # (out, in) view
                    lora = self.lora_product(name)
                    w.copy_((w.float() / g[:, None] - lora).to(w.dtype))
            self.merged_adapters.pop()
