"""Activation checkpointing of decoder layers, with optional offload of the kept layer inputs to CPU memory.

Chen et al., "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174). Each checkpointed layer
runs its forward without recording a graph and keeps only its input ``h`` (batch × seq × hidden); the
backward re-runs the layer on ``h`` (same RNG state, same autocast state) and backpropagates through
that. Activation memory falls from ``L · (every tensor a layer saves)`` to ``L · |h|`` plus one layer's
activations; the price is one more forward per step (~+33% compute).

With ``offload=True`` the kept inputs go to (pinned) CPU memory, copied asynchronously after the
layer's forward and copied back just before its recomputation, so the GPU holds only one layer's input
at a time: for Llama-3-8B at 2048 tokens, 32 × 16 MiB (bf16) move out of GPU memory.

Gradients reach the layer's trainable parameters (returned by the autograd function itself, so the
layer's output requires grad even when its input does not — no ``enable_input_require_grads`` trick is
needed) and the input. A call whose other tensor arguments require grad falls back to
``torch.utils.checkpoint`` (non-reentrant, no offload), which handles any argument.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slimtune.compat import LAYER_CACHE_NAMES
from slimtune.core.modules import transformer_blocks

__all__ = ["checkpoint_layers", "uncheckpoint_layers", "CheckpointedForward", "KeptInputs", "HostOffload"]


class KeptInputs:
    """Where a checkpointed layer keeps its input between its forward and its recomputation: here, the
    input tensor itself (no copy)."""

    def stash(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the layer's autograd node saves in place of ``hidden``."""
        return hidden

    def restore(self, kept: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``hidden`` again, on ``device``, for the recomputation."""
        return kept


class HostOffload(KeptInputs):
    """Offload: inputs of layers running on an accelerator are copied to page-locked host memory
    (asynchronously) and back just before the recomputation. On a CPU-only run there is no cheaper memory
    to move them to, so it keeps them in place, exactly like :class:`KeptInputs`."""

    @staticmethod
    def on_accelerator(device: torch.device) -> bool:
        """Whether ``device`` is accelerator memory (the seam the CPU tests turn on to watch the copies)."""
        return device.type != "cpu"

    def stash(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.on_accelerator(hidden.device):
            return hidden
        kept = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=hidden.device.type == "cuda")
        kept.copy_(hidden, non_blocking=True)
        return kept

    def restore(self, kept: torch.Tensor, device: torch.device) -> torch.Tensor:
        return kept.to(device, non_blocking=True, copy=True) if self.on_accelerator(device) else kept


class _RngState:
    """CPU and (if used) CUDA generator states at the start of a layer, restored for its recomputation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def restored(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _LayerCheckpoint(torch.autograd.Function):
    """``run(hidden)`` with only ``hidden`` kept (where ``inputs`` puts it); params are the layer's trainable ones."""

    @staticmethod
    def forward(ctx, run, inputs, hidden, *params):
        ctx.run, ctx.device, ctx.rng = run, hidden.device, _RngState(hidden.device)
        ctx.saved_params = params  # leaf parameters: holding them costs nothing
        kind = hidden.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        with torch.no_grad():
            out = run(hidden)
        ctx.inputs = inputs
        kept = inputs.stash(hidden)
        if kept is hidden:
            ctx.save_for_backward(hidden)
        else:  # not an autograd-tracked tensor: held on the node itself, so the layer input can be freed
            ctx.kept = kept
        return out

    @staticmethod
    def backward(ctx, *grads):
        kept = ctx.saved_tensors[0] if ctx.saved_tensors else ctx.kept
        ctx.kept = None
        hidden = ctx.inputs.restore(kept, ctx.device).detach().requires_grad_(ctx.needs_input_grad[2])
        kind, enabled, dtype = ctx.autocast
        with ctx.rng.restored(), torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            out = ctx.run(hidden)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        params = ctx.saved_params
        wanted = ([hidden] if hidden.requires_grad else []) + [p for p, need in zip(params, ctx.needs_input_grad[3:])
                                                               if need]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if pairs and wanted else [None] * len(wanted))
        grad_hidden = next(got) if hidden.requires_grad else None
        grad_params = [next(got) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, grad_hidden, *grad_params)


def _without_cache(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """No KV cache in a checkpointed layer: the recomputation would append its keys and values a second
    time (and a training step has no use for them), as transformers does under its own checkpointing.
    Caches may come positionally (GPT-2 blocks), by name, or through ``**kwargs``."""
    if signature is None:
        return args, kwargs
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:  # let the real call raise its own error
        return args, kwargs
    scopes = [bound.arguments] + [bound.arguments[p.name] for p in signature.parameters.values()
                                  if p.kind is p.VAR_KEYWORD and p.name in bound.arguments]
    for scope in scopes:
        for name in LAYER_CACHE_NAMES:
            if scope.get(name) is not None:
                scope[name] = None
        if scope.get("use_cache"):
            scope["use_cache"] = False
    return bound.args, bound.kwargs


class CheckpointedForward:
    """Replacement ``forward`` of one layer (an instance attribute set by :func:`checkpoint_layers`)."""

    def __init__(self, layer: nn.Module, inputs: KeptInputs) -> None:
        self.layer, self.inputs = layer, inputs
        self.inner = layer.__dict__.get("forward")  # an existing instance-level forward, else the class's
        self.signature: inspect.Signature | None
        try:
            self.signature = inspect.signature(self.inner or type(layer).forward.__get__(layer))
        except (TypeError, ValueError):  # a builtin without a signature
            self.signature = None

    def original(self, *args, **kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        layer = self.layer
        if not (layer.training and torch.is_grad_enabled()):
            return self.original(*args, **kwargs)
        args, kwargs = _without_cache(self.signature, args, kwargs)
        if args:
            hidden, rest, key = args[0], args[1:], None
        else:
            key = "hidden_states"
            hidden, rest = kwargs.get(key), ()
        others = list(rest) + [v for k, v in kwargs.items() if k != key]
        if (not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point()
                or any(isinstance(t, torch.Tensor) and t.requires_grad for t in others)):
            return checkpoint(self.original, *args, use_reentrant=False, **kwargs)
        extra = {k: v for k, v in kwargs.items() if k != key}

        def run(h):
            return self.original(h, *rest, **extra) if key is None else self.original(*rest, **{key: h}, **extra)

        # the trainable parameters are inputs of the node: their gradients are returned from it, and the
        # output requires grad whenever one of them does
        params = [p for p in layer.parameters() if p.requires_grad]
        return _LayerCheckpoint.apply(run, self.inputs, hidden, *params)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        return transformer_blocks(model)
    except ValueError:
        return []


def checkpoint_layers(model: nn.Module, offload: bool | KeptInputs = False,
                      layers: list[nn.Module] | None = None) -> list[str]:
    """Checkpoint every decoder layer of ``model`` (or the given ``layers``); ``offload=True`` keeps their
    inputs in pinned CPU memory (:class:`HostOffload`; any :class:`KeptInputs` may be given instead).
    Returns the names of the checkpointed layers.

    Active in training mode with gradients on; evaluation and generation run the layers unchanged.
    Undo with :func:`uncheckpoint_layers`.
    """
    chosen = _blocks(model) if layers is None else [
        (next((n for n, m in model.named_modules() if m is layer), type(layer).__name__), layer) for layer in layers]
    if not chosen:
        raise ValueError(f"found no decoder layers in {type(model).__name__} (no _no_split_modules, no nn.ModuleList); "
                         "pass them explicitly: checkpoint_layers(model, layers=[...])")
    if any(getattr(layer, "gradient_checkpointing", False) is True for _, layer in chosen):
        raise ValueError("transformers' gradient checkpointing is already on; checkpointing twice recomputes twice. "
                         "Call model.gradient_checkpointing_disable() first, or skip checkpoint_layers.")
    inputs = offload if isinstance(offload, KeptInputs) else HostOffload() if offload else KeptInputs()
    for _, layer in chosen:
        current = layer.__dict__.get("forward")
        if isinstance(current, CheckpointedForward):
            current.inputs = inputs
        else:
            layer.forward = CheckpointedForward(layer, inputs)
    return [name for name, _ in chosen]


def uncheckpoint_layers(model: nn.Module) -> int:
    """Undo :func:`checkpoint_layers`; returns how many layers were restored."""
    restored = 0
    for module in model.modules():
        current = module.__dict__.get("forward")
        if isinstance(current, CheckpointedForward):
            if current.inner is not None:
                module.forward = current.inner
            else:
                del module.forward
            restored += 1
    return restored
