"""Module surgery and layer geometry: one helper for each job, shared by every layer above.

- :func:`replace_module`: put a module at a dotted name.
- Layer geometry: :func:`is_conv1d` (transformers' GPT-2 ``Conv1D``, weight stored ``(in, out)``),
  :func:`is_dense_linear` (``nn.Linear`` or ``Conv1D``), :func:`linear_dims`;
  :func:`weight_of` / :func:`bias_of` read a layer's ``weight`` / ``bias`` typed as the tensors they are.
- The model's parts: :func:`output_embedding_name` / :func:`output_head_names` (the output layer),
  :func:`tied_weights` (layers sharing one weight, e.g. tied embeddings) and
  :func:`block_lists` / :func:`block_list` / :func:`transformer_blocks` (the repeated blocks).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TypeGuard, cast

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

# Names of the output head (PEFT leaves them out of "all-linear" too).
OUTPUT_HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "embed_out", "output")
# Names of the ModuleList that holds a model's transformer blocks, across architectures.
BLOCK_LIST_NAMES = ("layers", "h", "layer", "block", "blocks")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` inside ``model`` (``name`` must not be empty)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def is_conv1d(module: nn.Module) -> TypeGuard[Conv1D]:
    """transformers' GPT-2 ``Conv1D``: a linear layer computing ``x @ W + b`` with W stored ``(in, out)``."""
    return isinstance(module, Conv1D)


def is_dense_linear(module: nn.Module) -> TypeGuard[nn.Linear | Conv1D]:
    """A full-precision linear layer: ``nn.Linear`` or ``Conv1D`` (quantized layers are not)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer (``nn.Linear``, ``Conv1D``, quantized)."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    # Plain int attributes on every linear-like layer (what nn.Module.__getattr__ returns is typed Tensor | Module).
    return int(cast(int, module.in_features)), int(cast(int, module.out_features))


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight`` of a layer that has one (linear-like, embedding): a tensor, never a submodule."""
    return cast(torch.Tensor, module.weight)


def bias_of(module: nn.Module) -> torch.Tensor | None:
    """``module.bias`` of a linear-like layer: a tensor, or None when the layer has no bias."""
    return cast("torch.Tensor | None", module.bias)


def output_embedding_name(model: nn.Module) -> str | None:
    """Name of the module transformers' ``get_output_embeddings()`` returns (the LM head), if any."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def tied_weights(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """For each module of ``names`` whose ``weight`` another module of ``model`` holds too (an output layer tied to
    the input embedding, ``tie_word_embeddings``), those other modules' names, without slimtune's wrapper parts
    (``.base_layer``, ``.original_module``); modules that share no weight are left out."""
    owners: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight":
            owners.setdefault(id(param), []).append(re.sub(r"\.(base_layer|original_module)$", "", owner))
    tied = {}
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)  # a wrapper's is its base layer's
        others = [n for n in owners.get(id(weight), []) if n != name]
        if others:
            tied[name] = sorted(set(others))
    return tied


def held_parts(stored: Iterable[str]) -> set[str]:
    """Every module name above a stored tensor's (``a.b.c.weight`` → ``a``, ``a.b``, ``a.b.c``): what
    :func:`new_part` asks of each missing tensor, computed once."""
    return {".".join(parts[:depth]) for key in stored for parts in [key.split(".")] for depth in range(1, len(parts))}


def new_part(model: nn.Module, key: str, held: Collection[str], saved_parts: Collection[str]) -> str | None:
    """The part of ``model`` the checkpoint never had that the missing tensor ``key`` is in, to initialize as
    transformers does: a task head (``score``, ``classifier`` …), or a part the task's class adds to another
    class's checkpoint (a masked LM's pooler under SEQ_CLS). None when the tensor is missing beside stored ones (a
    layer of a block), is a part of the checkpoint's own class (its final norm), or is the language-model head (a
    base model's checkpoint, LlamaModel's, is not the LM's): an incomplete checkpoint. ``held``: :func:`held_parts`
    of the tensors the checkpoint filled; ``saved_parts``: :func:`checkpoint_class_parts`."""
    head = output_embedding_name(model)
    if head is not None and (key == head or key.startswith(head + ".")):
        return None
    parts = key.split(".")
    top: str | None = parts[0]  # nothing above it stored but the model itself: a new top-level part
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix in held:  # the nearest part the checkpoint holds
            top = ".".join(parts[:depth + 1]) if prefix == getattr(model, "base_model_prefix", None) else None
            break
    if top is None or top in output_head_names(model):
        return top
    return top if top not in saved_parts else None


def checkpoint_class_parts(model: nn.Module) -> set[str]:
    """Module names of the class the checkpoint was saved from (``config.architectures``), built on the meta device:
    a part of it that the checkpoint lacks is missing, not new. The model's own, when that class is the model's or
    unknown (every part is then the checkpoint's)."""
    config = getattr(model, "config", None)
    names = [a for a in getattr(config, "architectures", None) or [] if isinstance(a, str)]
    if not names or type(model).__name__ in names or not hasattr(transformers, names[0]):
        return {n for n, _ in model.named_modules()}
    try:
        with torch.device("meta"):
            saved_from = getattr(transformers, names[0])(config)
    except Exception:  # noqa: BLE001 - a class that cannot be built from this config: take every part as the model's
        return {n for n, _ in model.named_modules()}
    prefix = getattr(saved_from, "base_model_prefix", "") or ""
    parts = {n for n, _ in saved_from.named_modules()}
    # named as the model names them: its base model alone (LlamaModel's "norm") or a task model around it
    return parts | {n[len(prefix) + 1:] for n in parts if n.startswith(prefix + ".")} | {f"{prefix}.{n}" for n in parts}


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output layer: named like one (``lm_head``, ``score`` …) outside the numbered blocks (a
    block's own ``output`` layer, RWKV's or ProphetNet's, is not a head), or the output embedding."""
    names = {n for n, _ in model.named_modules()
             if n.split(".")[-1] in OUTPUT_HEAD_NAMES and not any(part.isdigit() for part in n.split("."))}
    head = output_embedding_name(model)
    return names | ({head} if head is not None else set())


def block_lists(model: nn.Module, layers_pattern: str | Sequence[str] | None = None) -> list[str]:
    """Names of the ``nn.ModuleList``\\ s of transformer blocks, outermost only, in model order (encoder first).

    A block list is named like ``layers_pattern`` (default: ``layers``, ``h``, ``layer``, ``block``,
    ``blocks``) and all its entries share one class. Raises with the lists that exist when none matches.
    """
    names = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or BLOCK_LIST_NAMES)
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or name.split(".")[-1] not in names:
            continue
        if len({type(m) for m in module}) != 1 or any(name.startswith(f + ".") for f in found):
            continue
        found.append(name)
    if not found:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ValueError(f"found no list of transformer blocks named {names} in {type(model).__name__}; "
                         f"pass layers_pattern naming one of its ModuleLists: {lists}.")
    return found


def transformer_blocks(model: nn.Module, layers_pattern: str | Sequence[str] | None = None
                       ) -> list[tuple[str, nn.Module]]:
    """Every transformer block as ``(name, module)``, in model order (see :func:`block_lists`); for a
    model whose block list has another name, the modules of the classes transformers lists in its
    ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block`` …)."""
    if isinstance(model, nn.ModuleList) and layers_pattern is None:  # the block list itself
        return [(str(i), block) for i, block in enumerate(model)]
    try:
        lists = block_lists(model, layers_pattern)
    except ValueError:
        kinds = set(getattr(model, "_no_split_modules", None) or ())
        found = [(n, m) for n, m in model.named_modules() if type(m).__name__ in kinds]
        if layers_pattern is not None or not found:
            raise
        return found
    return [(f"{name}.{i}", block) for name in lists for i, block in enumerate(block_list(model, name))]


def block_list(model: nn.Module, name: str) -> nn.ModuleList:
    """The block list called ``name`` (one that :func:`block_lists` found)."""
    blocks = model.get_submodule(name)
    assert isinstance(blocks, nn.ModuleList)  # block_lists names ModuleLists only
    return blocks


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in ``eval()`` mode within the block; afterwards every module's own mode is back (a model in
    ``train()`` may hold modules the user put in ``eval()``, which ``model.train(was_training)`` would flip)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        model.train(modes[0][1])  # (what a module's own train() does on a change of mode, e.g. transformers' kernels)
        for module, training in modes:
            module.training = training
