"""Model-level quantization: replace linear layers in place, undo it, and account for memory."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimtune.core.modules import (
    bias_of,
    is_conv1d,
    is_dense_linear,
    linear_dims,
    output_embedding_name,
    output_head_names,
    replace_module,
    weight_of,
)
from slimtune.core.state import find_state
from slimtune.quant import nf4
from slimtune.quant.config import QuantConfig
from slimtune.quant.linear import Linear4bit, Linear8bit, QuantizedLinear, linear_weight
from slimtune.quant.state import (
    bitsandbytes_state,
    is_8bit_prefix,
    is_bitsandbytes_layer,
    is_bitsandbytes_quantized,
    read_4bit_state,
    read_8bit_state,
)

__all__ = ["QuantSummary", "quantize", "quant_summary", "dequantize_model", "requantization_error",
           "skipped_linear_names", "keep_in_fp32_patterns", "make_quantized_layer", "layer_from_state", "dense_weight",
           "as_quantized_layer", "forget_quantization"]


def skipped_linear_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """Linear layers that ``config`` keeps in full precision: ``skip_modules``, the output heads (the LM head,
    a classification head such as ``score`` / ``classifier`` and the layers inside it, which
    ``modules_to_save`` trains) and the model's ``_keep_in_fp32_modules`` (T5's ``wo``: its forward casts
    activations to ``wo.weight.dtype``), which transformers+bitsandbytes never quantize either; and layers a
    quantized layer cannot stand in for: linear subclasses with a forward of their own (:func:`plain_linear`) and
    weights the model reads as tensors (:func:`read_as_tensors`)."""
    heads = output_head_names(model)
    head = output_embedding_name(model)  # wherever it is
    heads |= {head} if head is not None else set()
    keep = keep_in_fp32_patterns(model)
    direct = read_as_tensors(model)
    return [n for n, m in model.named_modules() if is_dense_linear(m) and (
        config.skips(n) or n in heads or any(n.startswith(h + ".") for h in heads) or _matches_module(n, keep)
        or n in direct or (weight_of(m).is_floating_point() and not is_bitsandbytes_quantized(m)
                           and not plain_linear(m)))]


# nn.Linear subclasses whose own forward is still x Wᵀ + b (a quantized layer computes the same).
PLAIN_LINEAR_CLASSES = frozenset({"FalconLinear"})
# A Mamba mixer (it holds ``A_log`` and ``D``; a Gated DeltaNet layer holds no ``D`` and calls its out_proj) reads
# these layers' weights as tensors: dt_proj's in its CPU path, all three in the fused CUDA kernels; a packed
# 4-bit weight there would be read as garbage.
MAMBA_TENSOR_LAYERS = ("dt_proj", "x_proj", "out_proj")


def plain_linear(module: nn.Module) -> bool:
    """Whether a linear layer computes only ``x Wᵀ + b`` (what a quantized layer replaces): ``Conv1D``, ``nn.Linear``
    and subclasses that keep its forward; not a router that returns (scores, indices) from its own forward (Llama
    4's, PhiMoE's), which transformers+bitsandbytes keep in full precision too. (A layer bitsandbytes already
    quantized is a subclass with its own forward too: it is taken as stored, and not asked about.)"""
    return is_conv1d(module) or type(module).forward is nn.Linear.forward or \
        type(module).__name__ in PLAIN_LINEAR_CLASSES


def read_as_tensors(model: nn.Module) -> set[str]:
    """Linear layers whose weight the model reads directly rather than calling them (Mamba mixers' projections)."""
    found = set()
    for name, module in model.named_modules():
        if hasattr(module, "A_log") and hasattr(module, "D"):
            found |= {f"{name}.{child}".lstrip(".") for child in MAMBA_TENSOR_LAYERS if hasattr(module, child)}
    return found


def keep_in_fp32_patterns(model: nn.Module, strict: bool = False) -> list[str]:
    """The model's ``_keep_in_fp32_modules`` (``strict``: ``_keep_in_fp32_modules_strict``) patterns, [] if none."""
    patterns = getattr(model, "_keep_in_fp32_modules_strict" if strict else "_keep_in_fp32_modules", None)
    return sorted(p for p in patterns or () if isinstance(p, str) and p)


def _matches_module(name: str, patterns: list[str]) -> bool:
    """transformers' ``should_convert_module`` test, negated: a pattern matches ``name`` from its start up to a
    module boundary (as a regex), or as a suffix."""
    return any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(p) for p in patterns)


def make_quantized_layer(in_features: int, out_features: int, bias: bool, config: QuantConfig,
                         device: torch.device | str, dtype: torch.dtype = torch.float32) -> QuantizedLinear:
    """An empty (meta) layer that ``quantize_`` or ``load_state_dict`` fills."""
    compute = config.resolved_compute_dtype(device)
    if config.bits == 8:
        return Linear8bit(in_features, out_features, bias, compute, dtype, device="meta")
    return Linear4bit(in_features, out_features, bias, config.quant_type, config.blocksize, config.double_quant,
                      compute, dtype, device="meta")


def layer_from_state(state: dict[str, torch.Tensor], prefix: str, in_features: int, out_features: int,
                     has_bias: bool, compute_dtype: torch.dtype, dtype: torch.dtype | None) -> QuantizedLinear:
    """The quantized layer that the 4-bit / 8-bit state stored under ``prefix`` in ``state`` (keys ``weight``,
    ``weight.absmax`` …, ``SCB``: transformers+bitsandbytes' layout) describes, as stored. ``dtype``: the dtype
    of its dequantized weight (None: the 4-bit state's recorded dtype, float32 for 8-bit)."""
    layer: QuantizedLinear
    if is_8bit_prefix(state, prefix):
        read_8bit_state(state, prefix, (out_features, in_features), [])  # checked here, where its keys are whole
        layer = Linear8bit(in_features, out_features, has_bias, compute_dtype, device="meta")
    else:
        qs = read_4bit_state(state, prefix, (out_features, in_features), [])
        dtype = dtype or qs["dtype"]
        layer = Linear4bit(in_features, out_features, has_bias, qs["quant_type"], qs["blocksize"],
                           "nested_absmax" in qs, compute_dtype, device="meta")
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    result = layer.load_state_dict(own, strict=False, assign=True)
    if result.missing_keys:
        raise ValueError(f"quantized checkpoint is missing {[prefix + k for k in result.missing_keys]}")
    layer.dtype = dtype or torch.float32  # a dequantized weight joins the model in the model's dtype
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.to(layer.dtype), requires_grad=False)
    return layer


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of a linear-like layer as a float ``(out, in)`` tensor, whatever holds it: dequantized for a
    slimtune quantized layer and for a bitsandbytes one (``Linear4bit`` — NF4 / FP4, double quant or not, any
    ``quant_storage`` — and ``Linear8bitLt``, decoded from its state as bitsandbytes' ``dequantize_4bit`` /
    ``int8_vectorwise_dequant`` decode it), a transposed view for ``Conv1D``, the parameter itself for
    ``nn.Linear``. ``dtype``: the result's (None: float32 when dequantized, else the weight's own)."""
    quantized = as_quantized_layer(module)
    if quantized is not None:
        return quantized.dequantize(dtype or torch.float32)
    weight = weight_of(module)
    weight = weight.T if is_conv1d(module) else weight
    return weight if dtype is None else weight.to(dtype)


def as_quantized_layer(module: nn.Module) -> QuantizedLinear | None:
    """``module`` itself when it is a slimtune quantized layer; for a bitsandbytes one, a slimtune layer holding
    the same codes and scales (its bias left out, its dtype the one the 4-bit state records, float32 for 8-bit);
    None for a full-precision layer."""
    if isinstance(module, QuantizedLinear):
        return module
    if not is_bitsandbytes_quantized(module):
        return None
    state = bitsandbytes_state(module)
    assert state is not None  # a bitsandbytes-quantized layer has a state, or bitsandbytes_state raised
    in_features, out_features = linear_dims(module)
    state.pop("bias", None)
    layer = layer_from_state(state, "", in_features, out_features, False, torch.float32, None)
    layer.conv1d = from_conv1d(module)
    return layer.to(weight_of(module).device)


def from_conv1d(module: nn.Module) -> bool:
    """Whether transformers made this bitsandbytes layer from a GPT-2 ``Conv1D`` (its ``source_cls``; the weight
    then stored as ``(out, in)``), which an export must write back as one."""
    return getattr(getattr(module, "source_cls", None), "__name__", None) == "Conv1D"


def forget_quantization(model: nn.Module) -> None:
    """Drop what says ``model`` is quantized once none of its layers is (transformers' ``hf_quantizer``, the
    config's ``quantization_config`` …, as its ``dequantize()`` does): saved, it must load as the plain model."""
    if any(isinstance(m, QuantizedLinear) or is_bitsandbytes_layer(m) for m in model.modules()):
        return
    for name in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if name in vars(model):
            delattr(model, name)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if config is not None and "_pre_quantization_dtype" in vars(config):  # (transformers 4: a torch.dtype, which
        del config._pre_quantization_dtype  # its JSON writer drops only beside a quantization_config)
    if getattr(model, "is_quantized", False):
        setattr(model, "is_quantized", False)  # noqa: B010 - transformers' flag (nn.Module declares no such field)


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

    Layers already quantized by bitsandbytes (a pre-quantized folder loaded by ``from_pretrained``) become
    slimtune layers holding the same codes and scales, as stored (``config`` does not apply to them).
    One layer at a time: each full-precision weight is released as soon as its layer is quantized
    (unless something else still references it), so peak memory grows by one layer, not a model.
    ``quant_summary(model)`` tells what was done.
    """
    config = config or QuantConfig()
    done = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if done:
        raise ValueError(f"the model is already quantized ({len(done)} quantized layers, e.g. {done[0]!r}); "
                         "quantize the full-precision model, or call dequantize_model() first")
    adapters = find_state(model)
    wrapper = next((n for n, _ in model.named_modules() if n.rpartition(".")[2] in ("base_layer", "original_module")),
                   None)  # (an adapter's wrapper, slimtune's or PEFT's, in a part of the model given alone)
    if adapters is not None or wrapper is not None:
        held = f"slimtune adapters {list(adapters.configs)}" if adapters is not None else f"an adapter ({wrapper})"
        raise ValueError(f"the model holds {held}: quantize the base model before adding adapters (here the "
                         "adapters' own layers would be quantized too), or merge them first (merge_and_unload)")
    skipped = set(skipped_linear_names(model, config))
    names = [n for n, m in model.named_modules() if is_dense_linear(m) and n not in skipped]
    stored: dict[str, dict[str, torch.Tensor]] = {}
    repacked = [n for n in names if getattr(getattr(weight_of(model.get_submodule(n)), "quant_state", None),
                                            "packing_format_for_cpu", False)]  # (reading the state undoes it)
    if repacked:
        warnings.warn(f"{repacked[0]} and {len(repacked) - 1} more layers were repacked by bitsandbytes for its CPU "
                      "inference kernel (the model ran in eval mode), which rounds their block scales to bf16: they "
                      "are taken as bitsandbytes gives them back, about 1e-3 from the stored weights. Quantize right "
                      "after from_pretrained, or load the folder with slimtune.load_model (as stored).", stacklevel=2)
    for name in names:  # checked first: a refusal halfway would leave the model half quantized
        try:
            state = bitsandbytes_state(model.get_submodule(name))
        except ValueError as error:
            raise ValueError(f"{name}: {error}; the model is unchanged") from None
        if state is not None:
            stored[name] = state
            continue
        weight = linear_weight(model.get_submodule(name))
        empty = not weight.numel() and (config.bits == 4 or not weight.shape[1])  # (8-bit: no outputs is fine)
        if weight.dtype not in nf4.QUANTIZABLE_DTYPES or empty:
            what = f"is empty {tuple(weight.shape)}" if empty else f"is {weight.dtype}"
            raise ValueError(f"{name}: the weight {what}, which cannot be quantized (float32, float16 or bfloat16 "
                             f"weights can); the model is unchanged. Leave it full precision with "
                             f"QuantConfig(skip_modules=[{name!r}, ...]).")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{name}: the weight has inf or NaN values, which a quantized layer cannot hold (they "
                             "would decode as NaN); the model is unchanged. A diverged or damaged checkpoint?")
    for name in names:  # names only: holding the modules would keep every fp32 weight alive
        linear = model.get_submodule(name)
        if name in stored:
            in_f, out_f = linear_dims(linear)
            adopted = layer_from_state(stored.pop(name), "", in_f, out_f, bias_of(linear) is not None,
                                       config.resolved_compute_dtype(weight_of(linear).device), None)
            adopted.conv1d = from_conv1d(linear)
            replace_module(model, name, adopted.to(weight_of(linear).device))
            continue
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
    """Replace every quantized layer (slimtune's, and bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, also one
    keeping 16-bit weights) by a frozen ``nn.Linear`` holding its dequantized weight (a GPT-2 ``Conv1D`` again for
    one made from it, so that ``save_pretrained`` writes its checkpoint layout).

    ``dtype`` defaults to each layer's original dtype (a bitsandbytes 8-bit layer's: float32). Works inside adapter
    wrappers too (their ``base_layer`` is replaced, by an ``nn.Linear`` the wrapper's math expects:
    :func:`restore_conv1d` turns it back once the adapter is merged and unloaded), which is what merging into a
    full-precision export needs.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) or is_bitsandbytes_layer(m)]
    # a bitsandbytes 8-bit layer records no dtype: the model's (its first floating-point weight's), as transformers
    unrecorded = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name in names:
        module = model.get_submodule(name)
        q = as_quantized_layer(module)
        if q is None:  # a bitsandbytes 8-bit layer keeping 16-bit weights: its weight as it is
            w, conv1d = weight_of(module).detach().to(dtype or weight_of(module).dtype), from_conv1d(module)
        else:
            own = unrecorded if is_bitsandbytes_quantized(module) and isinstance(q, Linear8bit) else q.dtype
            w, conv1d = q.dequantize(dtype or own), q.conv1d
        bias = bias_of(module)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(w.dtype), requires_grad=False)
        setattr(linear, "conv1d", conv1d)  # noqa: B010 - what restore_conv1d reads (nn.Linear has no such field)
        replace_module(model, name, linear)
    forget_quantization(model)
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
