"""LoRA layers: low-rank updates on linear, GPT-2 ``Conv1D``, quantized linear and embedding layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685. The LoRA family's
layers (DoRA, LoRA-FA, Delta-LoRA) derive from :class:`LoraLinear`; :mod:`slimtune.methods.lora`
holds the method that picks among them.
"""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.config import LoraConfig
from slimtune.core.dropout import dropout_then_linear
from slimtune.core.modules import is_conv1d, linear_dims
from slimtune.methods.layers import TunerLayer
from slimtune.methods.targets import pattern_value


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def rank_and_alpha(config: LoraConfig, module_name: str) -> tuple[int, float]:
    r = pattern_value(config.rank_pattern, module_name, config.r)
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    return r, alpha


def add_up_projection(result: torch.Tensor, down: torch.Tensor, B: nn.Module, scaling: float) -> torch.Tensor:
    """``result + scaling · B(down)``: one ``addmm`` (the scaling as its alpha) when the dtypes agree and ``B``
    is a plain bias-free linear layer, so no ``(tokens, out)`` product, scaled copy or sum is materialised
    in forward or backward; otherwise the three steps."""
    if (type(B) is nn.Linear and B.bias is None and not (B._forward_hooks or B._forward_pre_hooks)
            and result.dtype == down.dtype == B.weight.dtype and result.shape[:-1] == down.shape[:-1]
            and not torch.is_autocast_enabled(result.device.type)):
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), B.weight.t(),
                           alpha=scaling)
        return flat.view(result.shape)
    return result + (B(down) * scaling).to(result.dtype)


class LoraLinear(TunerLayer):
    """LoRA on a linear layer: ``h = W x + b + s · B A dropout(x)``.

    A: (r, in) Kaiming-uniform (a=√5), B: (out, r) zeros, so a new adapter is a no-op.
    ``s = alpha / r`` (rsLoRA: ``alpha / √r``). Merging adds ``s · B A`` to W (transposed for Conv1D).
    """

    adapter_attrs: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    adapter_values: ClassVar[tuple[str, ...]] = ("scaling", "lora_dropout")
    fusable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r, alpha = rank_and_alpha(config, module_name)
        weight = getattr(self.base_layer, "weight", None)
        # Adapters train in fp32 unless the base is a float type wider than half precision.
        dtype = weight.dtype if weight is not None and weight.dtype == torch.float64 else torch.float32
        device = self.adapter_device()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        self.reset_adapter(adapter_name, config.init_lora_weights)
        self.active_adapters.append(adapter_name)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, init: bool | str) -> None:
        a, b = self.lora_parameters(adapter_name)
        if init is False:  # both random: only useful for tests of a non-trivial adapter
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            return
        if init == "orthogonal":  # B A = 0 from two non-zero factors: rows of one orthogonal matrix (as PEFT)
            r = a.shape[0]
            if r % 2:
                raise ValueError(f"init_lora_weights='orthogonal' needs an even rank; this layer's is r={r}.")
            q = torch.linalg.qr(torch.randn(r, r))[0]  # (r, r), orthonormal rows: q[0::2] @ q[1::2].T = 0
            a.copy_((torch.randn(a.shape[1], r // 2) @ q[0::2]).T / 10.0)
            b.copy_(torch.randn(b.shape[0], r // 2) @ q[1::2] / 10.0)
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / a.shape[0])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    def lora_modules(self, adapter_name: str) -> tuple[nn.Linear, nn.Linear]:
        """The ``(A: in → r, B: r → out)`` layers of one adapter."""
        # add_adapter puts an nn.Linear in both ModuleDicts, whose items are typed as any nn.Module.
        return cast(nn.Linear, self.lora_A[adapter_name]), cast(nn.Linear, self.lora_B[adapter_name])

    def lora_parameters(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The live ``(A (r, in), B (out, r))`` of one adapter."""
        A, B = self.lora_modules(adapter_name)
        return A.weight, B.weight

    def lora_product(self, adapter_name: str) -> torch.Tensor:
        """``s · B A`` (out, in): the adapter's change to the weight in nn.Linear's layout."""
        A, B = self.lora_parameters(adapter_name)
        return B @ A * self.scaling[adapter_name]

    def low_rank_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        A, B = self.lora_parameters(adapter_name)
        return A, B * self.scaling[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.lora_product(adapter_name)
        return delta.T if self.fan_in_fan_out else delta  # (out, in) or Conv1D's (in, out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            (A, B), dropout = self.lora_modules(name), self.lora_dropout[name]
            down = dropout_then_linear(x.to(A.weight.dtype), A, dropout)  # A(dropout(x)), a 1-byte mask kept
            result = add_up_projection(result, down, B, self.scaling[name])
        return result

    def extra_repr(self) -> str:
        ranks = {n: m.out_features for n, m in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}"


class LoraEmbedding(TunerLayer):
    """LoRA on an embedding: ``E[x] + s · (A^T[x]) B^T``, A: (r, num_embeddings) zeros, B: (dim, r) N(0, 1); both
    terms times the embedding's ``embed_scale`` where it has one (Gemma)."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")
    adapter_values = ("scaling",)
    base_layer: nn.Embedding

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r, alpha = rank_and_alpha(config, module_name)
        base = self.base_layer
        weight = base.weight
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.zeros(r, base.num_embeddings, device=weight.device))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(base.embedding_dim, r, device=weight.device))
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        with torch.no_grad():
            if config.init_lora_weights is False:
                nn.init.normal_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])
        self.active_adapters.append(adapter_name)

    def lora_parameters(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The live ``(A (r, num_embeddings), B (dim, r))`` of one adapter."""
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def low_rank_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, s·B)`` as PEFT stores embedding factors: the change to the ``(num_embeddings, dim)`` table
        is ``(s·B A)ᵀ``."""
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name] * self.scaling[adapter_name]

    def mixed_batch_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        raise ValueError(f"mixed batches route adapters of linear layers; adapter {adapter_name!r} adapts an "
                         "embedding. Run it in its own batch.")

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return (B @ A).T * self.scaling[adapter_name]  # (num_embeddings, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        result = base(x)
        # A scaled embedding (Gemma's: the looked-up rows times √hidden) scales the update too, as it scales a
        # merged table; PEFT does the same.
        scale = getattr(base, "embed_scale", None)
        for name in self.unmerged_active():
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            rows = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)
            update = rows @ B.T * self.scaling[name]
            if scale is not None:
                update = update * (scale.to(update.dtype) if isinstance(scale, torch.Tensor) else scale)
            result = result + update.to(result.dtype)
        return result
