"""DoRA: weight-decomposed low-rank adaptation, selected with ``LoraConfig(use_dora=True)`` as in PEFT.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from slimtune.config import LoraConfig
from slimtune.methods.layers import check_finite_merge, mergeable_weight, widened_copy
from slimtune.methods.lora_layers import LoraLinear
from slimtune.quant.model import dense_weight
from slimtune.quant.state import is_bitsandbytes_quantized


class DoraLinear(LoraLinear):
    """DoRA on a linear layer: ``h = m ⊙ (W x + s B A dropout(x)) / ‖W + s B A‖_row + b``.

    The weight is split into a magnitude ``m`` (size out, initialised to ``‖W + s B A‖_row``, i.e.
    ``‖W‖_row`` for the default B = 0) and a direction ``(W + s B A) / ‖W + s B A‖_row``; the norm is a
    constant for backprop (paper §4.3), so m, A and B train and W stays frozen.

    - The norm never builds an ``(out, in)`` matrix: row-wise,
      ``‖W + sBA‖² = ‖W‖² + 2s·Σ B ⊙ (W Aᵀ) + s²·Σ B (A Aᵀ) ⊙ B``, where ``W Aᵀ`` is the base layer applied
      to the r rows of A (so 4-bit bases work
      unchanged) and ``‖W‖²_row`` is cached until the base weight changes. On a bitsandbytes layer, whose
      8-bit forward rounds its inputs (and picks outlier columns over all rows), ``W Aᵀ`` comes from its
      dequantized weight and its forward sees ``x`` alone, as in PEFT.
    - Dropout touches only the LoRA branch, so training runs ONE base matmul even with dropout > 0
      (PEFT runs a second one on the dropped-out input); in eval mode the two agree exactly.
    - Adapters added here with ``use_dora=False`` are plain LoRA adapters.
    """

    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")
    fusable = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()
        # One entry per merge call: the adapters it folded in, and each DoRA adapter's m / ‖·‖ (to unmerge exactly)
        self._merges: list[tuple[list[str], dict[str, torch.Tensor]]] = []
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
            if name in dora:
                wx = (base if bias is None else base - bias).to(lora.dtype)  # W x
                g = self.lora_magnitude_vector[name] / self.weight_norm(name, probes.get(name))  # norm detached
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
        if not names or args or kwargs or is_bitsandbytes_quantized(self.base_layer):
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
        """``rows Wᵀ`` (bias excluded) through the base layer itself, whatever its storage (a bitsandbytes layer's
        dequantized weight: its forward rounds the rows)."""
        if is_bitsandbytes_quantized(self.base_layer):
            return rows @ dense_weight(self.base_layer, rows.dtype).T
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

    @property
    def merge_calls(self) -> list[list[str]]:
        return [list(names) for names, _ in self._merges]

    def _merge(self, names: list[str], check_only: bool) -> None:
        """Fold adapters into W as the forward runs them: every DoRA norm is taken on W as it is before this call,
        whatever the order of the names, so ``W' = G ⊙ W + Σᵢ cᵢ sᵢ Bᵢ Aᵢ`` with ``cᵢ = gᵢ = mᵢ / ‖W + sᵢ Bᵢ Aᵢ‖``
        for a DoRA adapter (1 for a plain one) and ``G = 1 + Σ_DoRA (gᵢ − 1)`` (one value per row). W' is built on
        a copy and checked (see :meth:`TunerLayer.merge`)."""
        if not names:
            return
        w = self._weight_rows()
        scales = {n: self.magnitude_scale(n).detach() for n in names if n in self.lora_magnitude_vector}
        with torch.no_grad():
            merged = widened_copy(w)  # rounded once to W's dtype at the end, as PEFT's merge rounds
            if scales:
                check_finite_merge(merged.mul_(_row_scale(scales)), next(iter(scales)))
            for name in names:  # plain LoRA adapters only: W' = W + Σ s B A
                merged.add_(self._merge_term(name, scales))
                check_finite_merge(merged, name)
            merged = merged.to(w.dtype)
            check_finite_merge(merged, names[-1])  # (a cast to a narrower dtype can overflow)
            if check_only:
                return
            w.copy_(merged)
        self.merged_adapters += names
        self._merges.append((names, scales))

    def unmerge(self) -> None:
        """Undo the merge calls last-first, each with its kept scales: ``W = (W' − Σᵢ cᵢ sᵢ Bᵢ Aᵢ) / G``."""
        while self._merges:
            names, scales = self._merges.pop()
            w = self._weight_rows()
            with torch.no_grad():
                restored = widened_copy(w)
                for name in names:
                    restored.sub_(self._merge_term(name, scales))
                w.copy_(restored.div_(_row_scale(scales)) if scales else restored)
            del self.merged_adapters[-len(names):]

    def _merge_term(self, adapter_name: str, scales: dict[str, torch.Tensor]) -> torch.Tensor:
        """``cᵢ sᵢ Bᵢ Aᵢ`` (out, in): the adapter's low-rank part, times its DoRA scale g (1 for plain LoRA)."""
        lora = self.lora_product(adapter_name)
        return lora * scales[adapter_name][:, None] if adapter_name in scales else lora

    def _weight_rows(self) -> torch.Tensor:
        """The base weight as (out, in) rows (a transposed view for Conv1D), for merging in place."""
        weight = mergeable_weight(self.base_layer)
        return weight.T if self.fan_in_fan_out else weight


def _row_scale(scales: dict[str, torch.Tensor]) -> torch.Tensor:
    """``G = 1 + Σ (gᵢ − 1)`` as a column (out, 1): what W's rows are multiplied by in a merge of DoRA adapters."""
    return (1 + torch.stack(list(scales.values())).sub(1).sum(0))[:, None]
