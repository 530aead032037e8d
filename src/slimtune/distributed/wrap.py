"""Data parallel (DDP) or sharded (FSDP2 ``fully_shard``) training of a model with an adapter.

- ``ddp``: every rank holds the whole model; the trainable (adapter) gradients are all-reduced.
- ``fsdp``: every parameter is a DTensor sharded along dim 0 over the ranks; each decoder block is one
  FSDP unit (its base weights and its adapter weights are all-gathered together before its forward and
  freed after), the model itself the root unit. ``cpu_offload`` keeps the shards in CPU memory (GPU runs).
- ``auto``: fsdp when the model's weights, at their stored precision, exceed ``fsdp_fraction`` of one
  device's memory (a GPU's, or this host's RAM shared by its ranks), ddp otherwise.

Both reduce gradients as a mean over the ranks; the trainer scales each rank's loss by the world size and
divides by the label tokens of all ranks, so the result is the gradient of the global token mean.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.fsdp._fully_shard import _fsdp_param
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from slimtune.config import LoraConfig
from slimtune.core.state import find_state
from slimtune.distributed.context import DistContext
from slimtune.methods.sparse import in_place_owners
from slimtune.quant.linear import QuantizedLinear
from slimtune.quant.sharded_nf4 import make_model_shardable
from slimtune.train.recipe import Recipe

# DDP's switch for re-sending buffers at every forward, by capability: torch 2.13 names it forward_sync_buffers,
# earlier releases (2.11, the floor) broadcast_buffers.
_DDP_PARAMETERS = inspect.signature(DistributedDataParallel).parameters
_SYNC_BUFFERS = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_PARAMETERS else "broadcast_buffers"

__all__ = ["STRATEGIES", "choose_strategy", "strategy_for_bytes", "why_not_per_rank",
           "wrap_model", "unwrap", "gradient_sync", "full_trainable_parameters",
           "is_sharded", "held_bytes", "replicated_bytes"]

STRATEGIES = ("auto", "ddp", "fsdp")


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (a 4-bit base counts its packed bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def device_memory(device: torch.device) -> int:
    """Memory one rank may count on: its GPU's, or this host's RAM divided among the host's ranks."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(ranks_here, 1)


def choose_strategy(requested: str, model: nn.Module, device: torch.device, fsdp_fraction: float) -> str:
    """``requested`` unless it is ``auto`` (see the module docstring)."""
    if requested not in STRATEGIES:
        raise ValueError(f"distributed.strategy={requested!r} is not a strategy; use one of {list(STRATEGIES)}.")
    in_place = bool(in_place_owners(state)) if (state := find_state(model)) is not None else False
    if requested == "fsdp" and in_place:
        raise ValueError("distributed.strategy: fsdp cannot train a BitFit or selective adapter: it trains base "
                         "weights in place, and FSDP2 replaces them with sharded ones the adapter does not hold "
                         "(its files would keep the untrained values). Use distributed.strategy: ddp.")
    if requested != "auto":
        return requested
    return "ddp" if in_place else strategy_for_bytes(model_bytes(model), device_memory(device), fsdp_fraction)


def strategy_for_bytes(stored: int, memory: int, fsdp_fraction: float) -> str:
    """``auto``'s choice: fsdp when the model's stored bytes exceed ``fsdp_fraction`` of one device's memory."""
    return "fsdp" if stored > fsdp_fraction * memory else "ddp"


def why_not_per_rank(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot load its base per rank under FSDP2 (None: it can; slimtune.distributed.sharded_load):
    that needs a 4-bit ``quantization`` section and an adapter whose initial values do not depend on the base
    weights (LoRA without DoRA or modules_to_save)."""
    quantization = recipe.quantization
    if quantization is None or quantization.bits != 4:
        return "the base is not quantized to 4 bits"
    method = recipe.method
    if type(method) is not LoraConfig or method.use_dora or method.modules_to_save:
        return f"the method ({method.peft_type}) reads or copies base weights when it is added"
    return None


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: the children of the largest ``nn.ModuleList`` (by parameter count)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(biggest)


def wrap_model(model: nn.Module, strategy: str, ctx: DistContext, cpu_offload: bool = False) -> nn.Module:
    """The model to train with: ``model`` inside DDP, or ``model`` itself sharded in place by FSDP2."""
    if strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # buffers are the frozen base (4-bit weights, rotary tables): identical on every rank, never re-sent
        no_buffer_sync: dict[str, Any] = {_SYNC_BUFFERS: False}
        return DistributedDataParallel(model, device_ids=ids, **no_buffer_sync)
    if strategy != "fsdp":
        raise ValueError(f"strategy={strategy!r}: wrap_model takes 'ddp' or 'fsdp' (resolve 'auto' first).")
    check_fsdp_can_shard(model)
    make_model_shardable(model)  # 4-bit bases: packed codes and scales as block-aligned rows FSDP2 shards
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    offload = CPUOffloadPolicy() if cpu_offload and ctx.device.type == "cuda" else OffloadPolicy()
    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, offload_policy=offload)
    fully_shard(model, mesh=mesh, offload_policy=offload, ignored_params=_replicated_root(model, blocks, cpu_offload))
    return model


def _replicated_root(model: nn.Module, blocks: list[nn.Module], cpu_offload: bool) -> set[nn.Parameter] | None:
    """The frozen parameters outside the decoder blocks (embeddings, final norm, a frozen output head), which
    every rank keeps whole instead of sharding them in the root unit. FSDP2 gathers the root unit for the whole
    step (it reshards the root only after backward), and gathering needs its input, output and unsharded copy
    at once: for a 128k-vocabulary fp32 embedding (1.47 GiB on the 3B shape) that moment costs 3.7 GiB, while
    the whole tensor kept costs 1.47 GiB and no collective. Trainable ones stay sharded (their gradients must
    be reduced), and with ``cpu_offload`` everything stays sharded (offloaded to host memory)."""
    if cpu_offload:
        return None
    inside = {id(p) for block in blocks for p in block.parameters()}
    frozen = {p for p in model.parameters() if not p.requires_grad and id(p) not in inside}
    return frozen or None


def fsdp_shards_integer_parameters() -> bool:
    """Whether this torch's FSDP2 can shard a frozen integer parameter (a 4-bit base's packed codes): torch 2.11
    makes each sharded parameter require grad before setting the flag back, which integer tensors refuse;
    2.13 passes the flag along. Read from FSDP2's own code rather than the version number."""
    return "requires_grad=param.requires_grad" in inspect.getsource(_fsdp_param.FSDPParam._init_sharded_param)


def check_fsdp_can_shard(model: nn.Module) -> None:
    """A clear error before sharding a 4-bit base that this torch's FSDP2 cannot shard."""
    if any(isinstance(m, QuantizedLinear) for m in model.modules()) and not fsdp_shards_integer_parameters():
        raise ValueError(f"distributed.strategy: fsdp with a 4-bit base needs a newer torch (this torch "
                         f"{torch.__version__}'s FSDP2 cannot shard the packed integer weights; 2.13 can): use "
                         "distributed.strategy: ddp, or upgrade torch.")


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose parameters the optimizer, the adapter files and the evaluation use."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def held_bytes(model: nn.Module, quantized_only: bool = False) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole model): parameters (their local shards) and buffers; with
    ``quantized_only``, the quantized layers' packed weights and block scales (what grows with the model; their
    code books and double-quant statistics are small and replicated)."""
    if quantized_only:
        layers = [m for m in unwrap(model).modules() if isinstance(m, QuantizedLinear)]
        tensors = {id(t): t for m in layers for t in (m.weight, getattr(m, "absmax", m.weight))}
    else:
        tensors = {id(t): t for t in list(unwrap(model).parameters()) + list(unwrap(model).buffers())}
    mine = whole = 0
    for t in tensors.values():
        size = t.numel() * t.element_size()
        whole += size
        mine += t.to_local().numel() * t.element_size() if isinstance(t, DTensor) else size
    return mine, whole


def replicated_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers every rank holds whole (not FSDP2 shards): under FSDP2 the root's
    frozen parameters (see :func:`_replicated_root`), buffers, and layers whose rows are not whole blocks."""
    tensors = {id(t): t for t in list(unwrap(model).parameters()) + list(unwrap(model).buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values() if not isinstance(t, DTensor))


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward only if ``enabled`` (the last micro-batch of a step)."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield


@contextlib.contextmanager
def full_trainable_parameters(model: nn.Module, ctx: DistContext) -> Iterator[None]:
    """Within the block, rank 0's trainable parameters are whole tensors (for the adapter files), not shards.

    Collective: every rank must enter it. Only the trainable parameters are gathered (to rank 0's CPU), never
    the frozen base, so saving an adapter costs the adapter's memory. Without sharding it changes nothing.
    """
    model = unwrap(model)
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        yield
        return
    full = {name: p.full_tensor().cpu() for name, p in model.named_parameters()  # the same order on every rank
            if p.requires_grad and isinstance(p, DTensor)}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        if ctx.is_main:
            for name, value in full.items():
                owner_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                old = owner._parameters[attr]
                assert old is not None  # a trainable parameter by construction
                owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
                swapped.append((owner, attr, old))
        yield
    finally:
        for owner, attr, old in swapped:
            owner._parameters[attr] = old
