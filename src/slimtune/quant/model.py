"""Model-level quantization: replace linear layers in place, undo it, and account for memory."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimtune.core.modules import bias_of, is_conv1d, is_dense_linear, output_embedding_name, replace_module
from slimtune.quant import nf4
from slimtune.quant.config import QuantConfig
from slimtune.quant.linear import Linear4bit, Linear8bit, QuantizedLinear, linear_weight

__all__ = ["QuantSummary", "quantize", "quant_summary", "dequantize_model", "requantization_error",
           "skipped_linear_names", "make_quantized_layer"]


def skipped_linear_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """Linear layers that ``config`` keeps in full precision (skip_modules and the output head)."""
    head = output_embedding_name(model)
    return [n for n, m in model.named_modules() if is_dense_linear(m) and (config.skips(n) or n == head)]


def make_quantized_layer(in_features: int, out_features: int, bias: bool, config: QuantConfig,
                         device: torch.device | str, dtype: torch.dtype = torch.float32) -> QuantizedLinear:
    """An empty (meta) layer that ``quantize_`` or ``load_state_dict`` fills."""
    compute = config.resolved_compute_dtype(device)
    if config.bits == 8:
        return Linear8bit(in_features, out_features, bias, compute, dtype, device="meta")
    return Linear4bit(in_features, out_features, bias, config.quant_type, config.blocksize, config.double_quant,
                      compute, dtype, device="meta")


@dataclass
class QuantSummary:
    """What ``quantize`` did: layer counts, weight bytes before/after, what stays full precision."""

    layers: int = 0
    bytes_before: int = 0  # weights of the quantized layers, in their original dtype
    bytes_after: int = 0  # the tensors that now encode them (codes, scales, nested scales)
    params: int = 0  # weights quantized
    unquantized: list[str] = field(default_factory=list)  # linear layers kept in full precision

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_after / max(self.params, 1)

    def __str__(self) -> str:
        mib = 2 ** 20
        kept = ", ".join(self.unquantized) or "none"
        return (f"quantized {self.layers} linear layers ({self.params:,} weights): "
                f"{self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB "
                f"({self.bits_per_param:.3f} bits/weight); kept in full precision: {kept}")


def quant_summary(model: nn.Module) -> QuantSummary:
    """Summarise the quantized layers of ``model`` (bytes measured from the stored tensors)."""
    s = QuantSummary()
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            n = m.in_features * m.out_features
            s.layers += 1
            s.params += n
            s.bytes_before += n * m.dtype.itemsize
            s.bytes_after += m.storage_bytes()
        elif is_dense_linear(m):
            s.unquantized.append(name)
    return s


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Replace the model's linear layers by frozen 4-bit / 8-bit ones, in place, and return it.

    One layer at a time: each full-precision weight is released as soon as its layer is quantized
    (unless something else still references it), so peak memory grows by one layer, not a model.
    ``quant_summary(model)`` tells what was done.
    """
    config = config or QuantConfig()
    done = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if done:
        raise ValueError(f"the model is already quantized ({len(done)} quantized layers, e.g. {done[0]!r}); "
                         "quantize the full-precision model, or call dequantize_model() first")
    skipped = set(skipped_linear_names(model, config))
    names = [n for n, m in model.named_modules() if is_dense_linear(m) and n not in skipped]
    for name in names:  # checked first: a refusal halfway would leave the model half quantized
        if not torch.isfinite(linear_weight(model.get_submodule(name))).all():
            raise ValueError(f"{name}: the weight has inf or NaN values, which a quantized layer cannot hold (they "
                             "would decode as NaN); the model is unchanged. A diverged or damaged checkpoint?")
    for name in names:  # names only: holding the modules would keep every fp32 weight alive
        linear = model.get_submodule(name)
        w, bias = linear_weight(linear), bias_of(linear)
        layer = make_quantized_layer(w.shape[1], w.shape[0], bias is not None, config, w.device, w.dtype)
        layer.quantize_(w)
        layer.conv1d = is_conv1d(linear)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        replace_module(model, name, layer)
        del linear, w, bias, layer
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized layer by a frozen ``nn.Linear`` holding its dequantized weight (a GPT-2 ``Conv1D``
    again for one made from it, so that ``save_pretrained`` writes its checkpoint layout).

    ``dtype`` defaults to each layer's original dtype. Works inside adapter wrappers too (their
    ``base_layer`` is replaced, by an ``nn.Linear`` the wrapper's math expects: :func:`restore_conv1d` turns it
    back once the adapter is merged and unloaded), which is what merging into a full-precision export needs.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in names:
        q = model.get_submodule(name)
        assert isinstance(q, QuantizedLinear)  # names holds quantized layers only
        w = q.dequantize(dtype or q.dtype)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:
            linear.bias = nn.Parameter(q.bias.detach().to(w.dtype), requires_grad=False)
        setattr(linear, "conv1d", q.conv1d)  # noqa: B010 - what restore_conv1d reads (nn.Linear has no such field)
        replace_module(model, name, linear)
    return restore_conv1d(model)


def restore_conv1d(model: nn.Module) -> nn.Module:
    """Turn the ``nn.Linear`` layers :func:`dequantize_model` made from GPT-2 ``Conv1D`` layers back into ``Conv1D``
    (weight stored ``(in, out)``), except those still wrapped by an adapter (``base_layer``)."""
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and getattr(module, "conv1d", False)) or name.endswith("base_layer"):
            continue
        with torch.device("meta"):  # no full-size init: the dequantized weight is put in below
            conv = Conv1D(module.out_features, module.in_features)
        conv.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
        conv.bias = nn.Parameter(module.bias.detach() if module.bias is not None else
                                 module.weight.new_zeros(module.out_features), requires_grad=False)
        replace_module(model, name, conv)
    return model


@torch.no_grad()
def requantization_error(weight: torch.Tensor, config: QuantConfig | None = None) -> dict[str, float]:
    """Round-trip error of one weight under ``config``: mean |ΔW|, max |ΔW|, ||ΔW||_F / ||W||_F,
    and the stored bits per weight."""
    config = config or QuantConfig()
    w = weight.detach().float()
    layer = make_quantized_layer(w.shape[1], w.shape[0], False, config, w.device)
    layer.quantize_(w)
    diff = layer.dequantize(torch.float32) - w
    return {"mean_abs": diff.abs().mean().item(), "max_abs": diff.abs().max().item(),
            "rel_frobenius": (diff.norm() / w.norm().clamp(min=1e-30)).item(),
            "bits_per_param": 8 * layer.storage_bytes() / w.numel()}


def absmax_int4_error(weight: torch.Tensor, blocksize: int = 64) -> dict[str, float]:
    """Baseline for comparison: symmetric block-wise absmax int4 (levels -7..7, no code book)."""
    nf4.check_blocksize(blocksize)
    w = weight.detach().float().reshape(-1)
    pad = (-w.numel()) % blocksize
    blocks = torch.cat((w, w.new_zeros(pad))).view(-1, blocksize)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 7
    deq = (torch.round(blocks / scale).clamp(-7, 7) * scale).view(-1)[: w.numel()]
    diff = deq - w
    return {"mean_abs": diff.abs().mean().item(), "max_abs": diff.abs().max().item(),
            "rel_frobenius": (diff.norm() / w.norm().clamp(min=1e-30)).item(),
            "bits_per_param": 4 + 32 / blocksize}
