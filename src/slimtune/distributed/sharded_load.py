"""Per-rank loading of a 4-bit base under FSDP2: each rank reads and quantizes only the rows it will hold.

    empty model (meta) → 4-bit layers in row layout (meta) → adapter → fully_shard → fill each rank's shards

The model is built on the meta device and its linear layers replaced by empty
:class:`~slimtune.quant.linear.Linear4bit` layers in the row layout of :mod:`slimtune.quant.sharded_nf4`;
the adapter is added as in one process (:func:`stand_ins`); ``fully_shard`` gives every parameter a meta
dim-0 shard, ``c = ceil(rows / N)`` rows per rank as ``torch.chunk`` splits them (rank r: rows
``[r·c, min((r+1)·c, rows))``, the last ranks fewer or none). Only then is anything read: each rank reads
those rows of every weight from the safetensors file (or makes them, ``model.init: random``), quantizes them
(rows are whole quantization blocks), and puts them in its shard. Double quantization needs the whole
layer's fp32 block scales (the offset is their mean; 256-scale blocks cross shard boundaries): the ranks
all-gather them, one layer at a time, and every rank runs the single-process double quantization on them.
The shards are therefore bit for bit the rows of a one-process load, and no rank ever holds a whole
layer's full-precision or packed weight: what a rank holds falls as 1/N from the start, not only after
sharding. Replicated tensors (the double-quant statistics, code books, rotary tables) are whole everywhere.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import transformers
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from slimtune.core.modules import is_conv1d, is_dense_linear, linear_dims, replace_module
from slimtune.distributed.context import DistContext
from slimtune.quant.codebooks import codebook, dynamic_map
from slimtune.quant.config import QuantConfig
from slimtune.quant.linear import Linear4bit
from slimtune.quant.model import make_quantized_layer, skipped_linear_names
from slimtune.quant.sharded_nf4 import can_shard, double_quantize_rows, make_shardable, quantize_rows
from slimtune.quant.state import is_4bit_prefix, is_8bit_prefix
from slimtune.quant.streaming import CheckpointNeedsMerging, TensorSource, checkpoint_source, random_source
from slimtune.train.models import empty_model, load_tokenizer, random_std, resolve_model_path
from slimtune.train.recipe import Recipe
from slimtune.train.runner import random_model_config

__all__ = ["WholeLoadNeeded", "shard_rows", "ShardedBase", "quantized_skeleton", "fill_shards", "stand_ins",
           "load_skeleton"]


class WholeLoadNeeded(Exception):
    """The checkpoint cannot be read per rank (pickle files, layers stored quantized): every rank loads it whole."""


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` that FSDP2's dim-0 sharding gives ``rank`` (``torch.chunk``'s split)."""
    chunk = -(-rows // world_size)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


@dataclass
class ShardedBase:
    """An empty 4-bit model and where each of its tensors comes from (see :func:`quantized_skeleton`)."""

    model: nn.Module
    source: TensorSource
    config: QuantConfig
    layers: list[tuple[Linear4bit, str, bool]] = field(default_factory=list)  # layer, key prefix, Conv1D
    params: list[tuple[nn.Module, str, str]] = field(default_factory=list)  # owner, attribute, checkpoint key
    files: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the open checkpoint, until filled


def quantized_skeleton(model: nn.Module, source: TensorSource, config: QuantConfig,
                       device: torch.device) -> ShardedBase:
    """Replace ``model``'s (meta) linear layers by empty 4-bit layers, as :func:`slimtune.quant.load_quantized`
    would fill them, in row layout where their rows are whole blocks; record every tensor's checkpoint key.

    Raises :class:`WholeLoadNeeded` for a checkpoint whose layers are stored quantized, ValueError for one that
    lacks a tensor of the model."""
    base = getattr(model, "base_model_prefix", "") or ""
    skipped = set(skipped_linear_names(model, config))
    plan = ShardedBase(model, source, config)
    prefixes = {name: source.resolve_prefix(name, base) for name, m in model.named_modules() if is_dense_linear(m)}
    for prefix in prefixes.values():  # (a skipped layer too: it loads as stored, its producer's quantization)
        if prefix is not None and (is_4bit_prefix(source.keys, prefix) or is_8bit_prefix(source.keys, prefix)):
            raise WholeLoadNeeded(f"{prefix}weight is stored quantized")
    for name, old in [(n, m) for n, m in model.named_modules() if is_dense_linear(m) and n not in skipped]:
        prefix = prefixes[name]
        if prefix is None:
            continue  # tied or absent: reported below
        in_f, out_f = linear_dims(old)
        layer = make_quantized_layer(in_f, out_f, old.bias is not None, config, device, old.weight.dtype)
        assert isinstance(layer, Linear4bit)  # a 4-bit config (why_not_per_rank)
        layer.conv1d = is_conv1d(old)
        if can_shard(layer):
            make_shardable(layer)
        replace_module(model, name, layer)
        plan.layers.append((layer, prefix, is_conv1d(old)))
    quantized = {id(layer.weight) for layer, _, _ in plan.layers} | {id(layer.absmax) for layer, _, _ in plan.layers}
    found: set[int] = set()
    for owner_name, owner in model.named_modules():
        for attr, p in owner._parameters.items():
            if p is None or id(p) in quantized:
                continue
            key = source.resolve(f"{owner_name}.{attr}" if owner_name else attr, base)
            if key is not None:
                plan.params.append((owner, attr, key))
                found.add(id(p))
    empty = [n for n, p in model.named_parameters() if id(p) not in found | quantized]
    if empty:
        raise ValueError(f"the checkpoint has no tensor for {len(empty)} model entries, e.g. {empty[:5]}; "
                         "is it the checkpoint of this architecture?")
    return plan


@contextlib.contextmanager
def stand_ins(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Within the block, the model's meta parameters are zero-stride tensors of their shape on ``device``: an
    adapter added here is made on ``device`` from the same random numbers as in one process (adapters are put
    where their base layer's tensors are, and meta tensors draw no random numbers). Nothing may read the
    base weights here (they are one zero each): :func:`why_not_per_rank` admits only such methods."""
    originals: dict[int, torch.Tensor] = {}
    replaced: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in _tensor_stores(module):  # (a 4-bit layer's codes are buffers)
            for attr, t in store.items():
                if t is not None and t.is_meta:
                    if id(t) not in replaced:
                        zero = torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)
                        is_param = isinstance(t, nn.Parameter)
                        replaced[id(t)] = nn.Parameter(zero, requires_grad=t.requires_grad) if is_param else zero
                        originals[id(t)] = t
                    store[attr] = replaced[id(t)]
    back = {id(stand_in): originals[key] for key, stand_in in replaced.items()}
    try:
        yield
    finally:
        for module in model.modules():
            for store in _tensor_stores(module):
                for attr, t in store.items():
                    if t is not None and id(t) in back:
                        if isinstance(t, nn.Parameter):
                            back[id(t)].requires_grad_(t.requires_grad)  # the adapter froze the base
                        store[attr] = back[id(t)]


def _tensor_stores(module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    return cast("dict[str, Any]", module._parameters), cast("dict[str, Any]", module._buffers)


def _shard(p: torch.Tensor, read: Callable[[int, int], torch.Tensor], ctx: DistContext,
           dtype: torch.dtype | None = None) -> nn.Parameter:
    """The filled version of meta parameter ``p``: this rank's rows (``read(start, stop)``) as its FSDP2 shard."""
    if not isinstance(p, DTensor):  # not sharded: the whole tensor
        return nn.Parameter(read(0, p.shape[0]).to(ctx.device, dtype or p.dtype), requires_grad=p.requires_grad)
    local_shape = p.to_local().shape
    start, stop = shard_rows(p.shape[0], ctx.world_size, ctx.rank)
    if tuple(p.placements) != (Shard(0),) or stop - start != local_shape[0]:
        raise RuntimeError(f"FSDP2 gave rank {ctx.rank} a shard {tuple(local_shape)} of {tuple(p.shape)} with "
                           f"{p.placements}, not rows {start}:{stop}: this torch shards differently; use "
                           "distributed.strategy: ddp or report this with the torch version.")
    local = read(start, stop).to(ctx.device, dtype or p.dtype).reshape(local_shape)
    value = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return nn.Parameter(value, requires_grad=p.requires_grad)


@torch.no_grad()
def fill_shards(plan: ShardedBase, ctx: DistContext) -> None:
    """Read, quantize and place this rank's rows of every tensor of ``plan.model`` (after ``fully_shard``).

    Collective: every rank fills the layers in the same order (the double quantization all-gathers)."""
    with plan.files:  # closes the checkpoint files at the end
        _fill(plan, ctx)


def _fill(plan: ShardedBase, ctx: DistContext) -> None:
    source, filled = plan.source, dict[int, nn.Parameter]()
    for layer, prefix, transposed in plan.layers:
        key = prefix + "weight"
        if transposed:  # Conv1D stores (in, out): a rank's rows are columns there, so the layer is read whole
            def read(start: int, stop: int, key: str = key) -> torch.Tensor:
                return source.get(key).t()[start:stop]
        else:
            def read(start: int, stop: int, key: str = key) -> torch.Tensor:
                return source.get_rows(key, start, stop)
        if not isinstance(layer.weight, DTensor):  # rows are not whole blocks: the layer stays replicated
            layer.quantize_(read(0, layer.out_features).to(ctx.device))
            continue
        _fill_layer(layer, read, ctx, filled)
    for owner, attr, key in plan.params:
        p = owner._parameters[attr]
        if p is not None and p.is_meta and id(p) not in filled:
            filled[id(p)] = _shard(p, functools.partial(source.get_rows, key), ctx)
    for module in plan.model.modules():  # every reference, so tied weights stay tied
        for attr, p in module._parameters.items():
            if p is not None and id(p) in filled:
                module._parameters[attr] = filled[id(p)]
    empty = [n for n, t in list(plan.model.named_parameters()) + list(plan.model.named_buffers()) if t.is_meta]
    if empty:
        raise ValueError(f"{len(empty)} model entries were not filled, e.g. {empty[:5]}")


def _fill_layer(layer: Linear4bit, read: Callable[[int, int], torch.Tensor], ctx: DistContext,
                filled: dict[int, nn.Parameter]) -> None:
    """Quantize this rank's rows of ``layer`` into its row-layout shards (see the module docstring)."""
    start, stop = shard_rows(layer.out_features, ctx.world_size, ctx.rank)
    rows = read(start, stop).to(ctx.device)  # (stop - start, in)
    packed, absmax = quantize_rows(rows, layer.quant_type, layer.blocksize)
    if layer.double_quant:  # the whole layer's fp32 scales, gathered: the offset is their mean
        absmax, layer.nested_absmax, layer.nested_offset = double_quantize_rows(
            ctx.gather_rows(absmax, layer.out_features), start, stop)
        layer.nested_quant_map = dynamic_map(True, ctx.device)
    layer.quant_map, layer.dtype = codebook(layer.quant_type, ctx.device), rows.dtype
    filled[id(layer.weight)] = _shard(layer.weight, lambda a, b: packed, ctx)
    filled[id(layer.absmax)] = _shard(layer.absmax, lambda a, b: absmax, ctx)


def load_skeleton(recipe: Recipe, device: torch.device) -> tuple[ShardedBase, Any]:
    """The recipe's model as an empty 4-bit skeleton with its tensor source, and its tokenizer (what
    :func:`slimtune.train.runner.load_model` loads whole)."""
    spec, config = recipe.model, recipe.quantization
    assert config is not None  # why_not_per_rank
    files = contextlib.ExitStack()
    if spec.init == "random":
        model_config, _ = random_model_config(recipe)
        model = empty_model(model_config, spec.dtype)
        source = random_source(model, random_std(model_config), recipe.training.seed, device)
        tokenizer = load_tokenizer(spec.tokenizer or "default", spec.allow_pickle)
    else:
        folder = resolve_model_path(spec.name_or_path, allow_pickle=spec.allow_pickle)
        if not any(folder.glob("*.safetensors")):
            raise WholeLoadNeeded(f"{folder} holds no safetensors files")
        model = empty_model(transformers.AutoConfig.from_pretrained(folder), spec.dtype)
        source = checkpoint_source(folder, files)
        try:
            source.follow_renames(model)
        except CheckpointNeedsMerging as why:
            files.close()
            raise WholeLoadNeeded(str(why)) from why
        tokenizer = load_tokenizer(spec.tokenizer or folder, spec.allow_pickle)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    try:
        plan = quantized_skeleton(model, source, config, device)
    except BaseException:
        files.close()
        raise
    plan.files = files
    return plan, tokenizer
