"""The modules of AdapterHub's bottleneck family, written from its definitions: one bottleneck adapter
(sequential or parallel) and the AdapterFusion layer. Parameter names are AdapterHub's, so its weight
files map onto them one to one.

Sequential adapter (Houlsby et al., arXiv:1902.00751; Pfeiffer et al., arXiv:2005.00247), at a site with
sub-layer output ``h``, sub-layer input (residual) ``r`` and the model's layer norm ``LN`` (BERT; none in
pre-norm models)::

    x, res = pre(h, r)                        # original_ln_before: x = LN(h + r); residual_before_ln picks res
    y = s · W_up act(W_down [LN_b] x) [· gate]     # scaling s: a number, or learned ("learned", "channel")
    y = [LN_a](y + res)                       # adapter_residual_before_ln / ln_after order the two
    out = LN(y + r)                           # original_ln_after (LN absent: y + r)

Parallel adapter (He et al., arXiv:2110.04366): ``x = r`` (the sub-layer's input), ``y = s · W_up act(W_down r)``
without its own residual, then ``out = LN(h + y + r)``.

AdapterFusion (Pfeiffer et al., arXiv:2005.00247): per token, attention with query ``Q x`` over the
fused adapters' outputs ``u_i`` (keys ``K u_i``, values ``V u_i``), plus the residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Non-linearities by AdapterHub's names (it uses transformers' ACT2FN; "leakyrelu" is its own addition).
ACTIVATIONS: dict[str, Any] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "gelu_new": lambda: nn.GELU(approximate="tanh"), "leakyrelu": nn.LeakyReLU,
}
INIT_WEIGHTS = ("bert", "mam_adapter", "houlsby")


@dataclass(frozen=True)
class AdapterOptions:
    """How one AdapterHub bottleneck adapter computes (AdapterHub's ``BnConfig`` field names)."""

    non_linearity: str = "relu"
    is_parallel: bool = False
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    dropout: float = 0.0
    init_weights: str = "bert"
    init_weights_seed: int | None = None


def init_bert(module: nn.Module) -> None:
    """BERT's initialiser, as AdapterHub applies it: linear weights ~ N(0, 0.02²), biases 0, norms 1/0."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class BottleneckAdapter(nn.Module):
    """One AdapterHub bottleneck adapter of input size ``d`` and bottleneck ``m`` (see the module docstring)."""

    def __init__(self, d: int, m: int, options: AdapterOptions, device: torch.device | None = None) -> None:
        super().__init__()
        self.options = options
        if options.init_weights_seed is not None:
            torch.manual_seed(options.init_weights_seed)  # AdapterHub: every module starts from the same seed
        down: list[nn.Module] = [nn.LayerNorm(d, device=device)] if options.ln_before else []
        down += [nn.Linear(d, m, device=device), ACTIVATIONS[options.non_linearity.lower()]()]
        self.adapter_down = nn.Sequential(*down)  # (…, d) → (…, m)
        self.adapter_up = nn.Linear(m, d, device=device)  # (…, m) → (…, d)
        self.scaling: float | nn.Parameter = options.scaling if isinstance(options.scaling, (int, float)) else \
            nn.Parameter(torch.ones(1 if options.scaling == "learned" else d, device=device))
        self.adapter_norm_after = nn.LayerNorm(d, device=device) if options.ln_after else None
        self.gate = nn.Linear(d, 1, device=device) if options.use_gating else None
        self.dropout = nn.Dropout(options.dropout)
        with torch.no_grad():
            self._init(options.init_weights)

    def _init(self, kind: str) -> None:
        linears = [m for m in self.adapter_down if isinstance(m, nn.Linear)] + [self.adapter_up]
        if kind == "bert":
            init_bert(self)
        elif kind == "mam_adapter":
            nn.init.kaiming_uniform_(linears[0].weight, a=math.sqrt(5))
            nn.init.zeros_(linears[0].bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
            if self.gate is not None:
                init_bert(self.gate)
        elif kind == "houlsby":
            for linear in linears:
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(linear.bias)
        else:
            raise ValueError(f"init_weights={kind!r} is not supported; use one of {INIT_WEIGHTS}.")

    # ---- AdapterHub's three steps: what goes in, the adapter, what comes out --------------------------------
    def pre_forward(self, h: torch.Tensor, r: torch.Tensor, norm: nn.Module | None, query_before_ln: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(adapter input, fusion query, adapter residual)`` from the sub-layer output ``h`` and input ``r``."""
        o = self.options
        if o.is_parallel:
            return r, r, r
        residual = h
        query = h
        if o.original_ln_before:
            h = h + r
            if o.residual_before_ln == "post_add":
                residual = h
            if norm is not None:
                h = norm(h)
        if not o.residual_before_ln:
            residual = h
        return h, (query if query_before_ln else h), residual

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, up)``: the adapter's output and its scaled up-projection (what AdapterFusion attends over)."""
        o = self.options
        dtype = self.adapter_up.weight.dtype  # the adapter computes in its own dtype (fp32 beside a bf16 model)
        x_, residual_ = x.to(dtype), residual.to(dtype)
        up = self.adapter_up(self.adapter_down(x_)) * self.scaling  # (…, d) → (…, m) → (…, d)
        out = self.dropout(up)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x_)).mean(dim=1).unsqueeze(-1)  # gate: (batch, 1, 1)
        if o.is_parallel:
            return (out if self.adapter_norm_after is None else self.adapter_norm_after(out)).to(x.dtype), up
        if o.adapter_residual_before_ln:
            out = out + residual_
        if self.adapter_norm_after is not None:
            out = self.adapter_norm_after(out)
        if not o.adapter_residual_before_ln:
            out = out + residual_
        return out.to(x.dtype), up

    def post_forward(self, y: torch.Tensor, h: torch.Tensor, r: torch.Tensor, norm: nn.Module | None,
                     residual_outside: bool) -> torch.Tensor:
        """The site's output from the adapters' ``y``. ``residual_outside``: the model adds ``r`` itself after
        the site (pre-norm blocks), so what is returned leaves it out."""
        o = self.options
        if o.is_parallel:
            y = y + h
        if o.original_ln_after:
            if norm is not None:
                return norm(y + r)
            return y if residual_outside else y + r
        return y - r if residual_outside else y


@dataclass(frozen=True)
class FusionOptions:
    """AdapterHub's ``AdapterFusionConfig`` (its "dynamic" preset by default)."""

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True


class FusionLayer(nn.Module):
    """AdapterFusion at one site: ``out = Σ_i softmax_i((Q q)·(K u_i) / T) · V u_i + residual``.

    ``q``: (batch, seq, d) query; ``u``: (batch, seq, n, d) the fused adapters' scaled up-projections.
    Without query, key and value a single ``dense`` scores each adapter. With ``temperature`` the softmax
    starts at T = 50 and anneals by 0.05 per forward to 1 (as AdapterHub does).
    """

    def __init__(self, d: int, options: FusionOptions, dropout: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.options = options
        self.dense = nn.Linear(d, 1, device=device) if not (options.query or options.key or options.value) else None
        self.query = nn.Linear(d, d, device=device) if options.query else None
        self.key = nn.Linear(d, d, device=device) if options.key else None
        self.value = nn.Linear(d, d, bias=False, device=device) if options.value else None
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            for linear in (self.query, self.key, self.value):
                if linear is not None:
                    init_bert(linear)
            if self.value is not None and options.value_initialized:
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)  # starts as (almost) the identity
        self.T = 50.0 if options.temperature else 1.0
        self.reduction = self.T / 1000.0

    def forward(self, query: torch.Tensor, up: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.residual_before:
            up = up + residual.unsqueeze(2)
        q = self.query(query) if self.query is not None else query  # (batch, seq, d)
        k = self.key(up) if self.key is not None else up  # (batch, seq, n, d)
        v = self.value(up) if self.value is not None and o.value_before_softmax else up
        scores = self.dropout(torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)).squeeze(2))  # (batch, seq, n)
        probs = torch.softmax(scores / self.T, dim=-1)
        self.T = max(self.T - self.reduction, 1.0)
        out = torch.matmul(probs.unsqueeze(2), v).squeeze(2)  # (batch, seq, d)
        if self.value is not None and not o.value_before_softmax:
            out = self.value(out)
        return out if o.residual_before else out + residual
