"""Several named adapters on one base: add, switch, delete, enable/disable, merge one, combine, mixed batches.

    slimtune.add_adapter(model, LoraConfig(...), "math")          # or slimtune.load_adapter(model, path, "code")
    slimtune.set_adapter(model, "math")                           # what model(...) runs
    slimtune.combine_adapters(model, ["math", "code"], [0.7, 0.3], "mix")     # exact: ΔW = Σ wᵢ ΔWᵢ
    with slimtune.mixed_batch(model, ["math", "code", None]):      # row i uses its own adapter (None: base)
        model.generate(**batch)

Unmerging everything is ``slimtune.unmerge(model)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from slimtune.config import LoraConfig, MethodConfig
from slimtune.inject import get_state, inject, merge, remove_adapter, saved_modules, set_active_adapters, \
    tuner_layers, unmerge
from slimtune.io import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, atomic_write, read_adapter_config, \
    read_adapter_tensors
from slimtune.methods import LoraEmbedding, LoraLinear
from slimtune.methods.delta_lora import DeltaLoraConfig
from slimtune.methods.lora import lora_scaling
from slimtune.methods.vera import VeraLinear
from slimtune.targets import pattern_value

BASE = "__base__"  # PEFT's row name for "no adapter"; None works too


# ---- named adapters ---------------------------------------------------------------------------------
def list_adapters(model: nn.Module) -> list[str]:
    return list(get_state(model).configs)


def _check_known(model: nn.Module, names: Sequence[str]) -> None:
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {known}. Add one with "
                         "slimtune.add_adapter or slimtune.load_adapter(model, path, adapter_name=...).")


def add_adapter(model: nn.Module, config: MethodConfig, adapter_name: str) -> nn.Module:
    """Add a new adapter without activating it (unless it is the model's first)."""
    return inject(model, config, adapter_name, activate=False)


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (or several names, their outputs summed) the active adapter(s)."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    _check_known(model, names)
    set_active_adapters(model, names)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an inactive, unmerged adapter (layers left without adapters become their originals again)."""
    _check_known(model, [adapter_name])
    state = get_state(model)
    if adapter_name in state.active:
        others = [n for n in state.configs if n not in state.active]
        fix = (f"switch first, e.g. slimtune.set_adapter(model, {others[0]!r})" if others
               else "remove slimtune entirely with slimtune.unload(model)")
        raise ValueError(f"adapter {adapter_name!r} is active and cannot be deleted; {fix}.")
    if any(adapter_name in layer.merged_adapters for _, layer in tuner_layers(model)):
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; call slimtune.unmerge(model) "
                         "before deleting it.")
    remove_adapter(model, adapter_name)


def merge_adapter(model: nn.Module, adapter_name: str) -> None:
    """Fold one adapter into the base weights (active or not: once merged it always applies)."""
    _check_known(model, [adapter_name])
    merge(model, [adapter_name])


def _switchable(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in tuner_layers(model)] + [m for _, m in saved_modules(model)]


def _set_disabled(model: nn.Module, disabled: bool) -> None:
    for module in _switchable(model):
        module.disabled = disabled
    for config in get_state(model).configs.values():  # methods without wrapped layers (prompts, sparse)
        if hasattr(config, "set_disabled"):
            config.set_disabled(model, disabled)


def disable_adapter_layers(model: nn.Module) -> None:
    """Run the base model alone until :func:`enable_adapter_layers` (merged adapters are unmerged first)."""
    unmerge(model)
    _set_disabled(model, True)


def enable_adapter_layers(model: nn.Module) -> None:
    _set_disabled(model, False)


# ---- exact and SVD combination ------------------------------------------------------------------------
def _lora_pair(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, s·B)`` of a LoRA adapter, ``ΔW = s B A`` (transposed for embeddings, as PEFT stores them)."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name] * layer.scaling[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight * layer.scaling[name]


def combine_factors(pairs: Sequence[tuple[float, torch.Tensor, torch.Tensor]], combination_type: str = "cat",
                    rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA pair ``(A, B)`` for ``Σ wᵢ Bᵢ Aᵢ`` from ``(wᵢ, Aᵢ (rᵢ, in), Bᵢ (out, rᵢ))``.

    ``"cat"``: exact, rank Σ rᵢ: ``A = [A₁; A₂; …]``, ``B = [w₁B₁, w₂B₂, …]``.
    ``"svd"``: the best rank-``rank`` approximation (Eckart–Young), from the QR factors of the exact
    pair, so no ``(out, in)`` matrix is built; zero-padded when the exact rank is lower.
    """
    A = torch.cat([a.detach().float() for _, a, _ in pairs])
    B = torch.cat([w * b.detach().float() for w, _, b in pairs], 1)
    if combination_type == "cat":
        return A, B
    q_b, r_b = torch.linalg.qr(B)  # B = Q_b R_b
    q_a, r_a = torch.linalg.qr(A.T)  # Aᵀ = Q_a R_a, so B A = Q_b (R_b R_aᵀ) Q_aᵀ
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    A_k, B_k = (root[:, None] * vh[:k]) @ q_a.T, (q_b @ u[:, :k]) * root
    pad = rank - k
    return torch.cat([A_k, A_k.new_zeros(pad, A_k.shape[1])]), torch.cat([B_k, B_k.new_zeros(B_k.shape[0], pad)], 1)


def _check_combination(adapters: Sequence[str], weights: Sequence[float], combination_type: str,
                       rank: int | None, configs: Sequence[MethodConfig]) -> None:
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters {list(adapters)} but "
                         f"{len(weights)} weights {list(weights)}.")
    if combination_type not in ("cat", "svd"):
        raise ValueError(f"combination_type={combination_type!r} is not supported; use 'cat' (exact, rank Σ rᵢ) "
                         "or 'svd' (best approximation of a chosen rank).")
    if combination_type == "svd" and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"combination_type='svd' needs rank=<positive int> (got rank={rank!r}).")
    if combination_type == "cat" and rank is not None:
        raise ValueError(f"rank={rank!r} only applies to combination_type='svd'; 'cat' keeps the exact rank Σ rᵢ.")
    for name, config in zip(adapters, configs):
        if not isinstance(config, LoraConfig) or config.use_dora or isinstance(config, DeltaLoraConfig):
            kind = "DoRA" if getattr(config, "use_dora", False) else config.peft_type
            raise ValueError(f"adapter {name!r} is {kind}: only plain LoRA adapters (ΔW = s B A) combine exactly. "
                             "Merge it instead, or combine LoRA adapters only.")
        if config.modules_to_save or config.bias != "none":
            raise ValueError(f"adapter {name!r} also trains biases or modules_to_save ({config.bias=}, "
                             f"{config.modules_to_save=}); those have no weighted combination.")
    bases = {c.base_model_name_or_path for c in configs} - {None}
    if len(bases) > 1:
        raise ValueError(f"adapters {list(adapters)} were trained on different bases {sorted(bases)}; combine "
                         "adapters of one base model only.")


def _combined_config(template: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """A LoRA config with scaling 1 everywhere, exact per-module ranks and full module names as targets."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank; others by pattern
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern=dict(pattern), task_type=template.task_type, base_model_name_or_path=template.base_model_name_or_path)


def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                     combination_type: str = "cat", rank: int | None = None, activate: bool = False) -> nn.Module:
    """Add ``adapter_name``: the LoRA adapter with ``ΔW = Σ wᵢ ΔWᵢ`` per module (see :func:`combine_factors`)."""
    _check_known(model, adapters)
    state = get_state(model)
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick a new name for the combination.")
    configs = [state.configs[a] for a in adapters]
    _check_combination(adapters, weights, combination_type, rank, configs)
    combined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_name, layer in tuner_layers(model):
        pairs = [(w, *_lora_pair(layer, a)) for a, w in zip(adapters, weights) if a in layer.adapter_names]
        if pairs:
            combined[module_name] = combine_factors(pairs, combination_type, rank)
    inject(model, _combined_config(configs[0], {m: a.shape[0] for m, (a, _) in combined.items()}),
           adapter_name, activate=activate)
    with torch.no_grad():
        for module_name, (A, B) in combined.items():
            layer = model.get_submodule(module_name)
            embedding = isinstance(layer, LoraEmbedding)  # scaling is 1: A and B go in as they are
            (layer.lora_embedding_A[adapter_name] if embedding else layer.lora_A[adapter_name].weight).copy_(A)
            (layer.lora_embedding_B[adapter_name] if embedding else layer.lora_B[adapter_name].weight).copy_(B)
    return model


def combine_adapter_files(paths: Sequence[str | os.PathLike], weights: Sequence[float], output: str | os.PathLike,
                          combination_type: str = "cat", rank: int | None = None) -> Path:
    """:func:`combine_adapters` on saved LoRA adapters (PEFT's format), without loading a model."""
    configs = [read_adapter_config(p) for p in paths]
    _check_combination([str(p) for p in paths], weights, combination_type, rank, configs)
    per_module: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
    shapes: dict[str, tuple[str, tuple, tuple]] = {}
    for path, config, weight in zip(paths, configs, weights):
        for module, (kind, A, B) in _file_pairs(path, config).items():
            shape = (kind, A.shape[1], B.shape[0])
            first = shapes.setdefault(module, (str(path), *shape))
            if first[1:] != shape:
                raise ValueError(f"{module}: {path} adapts a {shape[0]} of (in, out) = {shape[1:]}, but {first[0]} one "
                                 f"of {first[2:]}; the adapters were trained for different model shapes.")
            per_module.setdefault(module, []).append((weight, A, B))
    tensors, ranks = {}, {}
    for module, pairs in per_module.items():
        A, B = combine_factors(pairs, combination_type, rank)
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if shapes[module][1] == "embedding" else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{module}.{a_key}"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.{b_key}"] = B.contiguous()
        ranks[module] = A.shape[0]
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    data = {**_combined_config(configs[0], ranks).to_dict(), "inference_mode": True}
    atomic_write(folder / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return folder


def _file_pairs(path, config: LoraConfig) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """module → (kind, A, s·B) read from an adapter folder."""
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in read_adapter_tensors(path).items()}
    out = {}
    for key, A in tensors.items():
        for kind, a_suffix, b_suffix in (("linear", ".lora_A.weight", ".lora_B.weight"),
                                         ("embedding", ".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suffix):
                module = key.removesuffix(a_suffix)
                alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
                s = lora_scaling(alpha, A.shape[0], config.use_rslora)
                out[module] = (kind, A, tensors[module + b_suffix] * s)
    other = [k for k in tensors if not any(k == m + suffix for m in out for suffix in (
        ".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"))]
    if other:
        raise ValueError(f"{path} holds tensors that are not plain LoRA factors, e.g. {other[:2]}; only LoRA "
                         "adapters combine.")
    return out


# ---- mixed batches -------------------------------------------------------------------------------------
def _row_factors(layer: nn.Module, module_name: str, name: str):
    """``(A (r, in), B (out, r), g (out,) or None)``: the adapter turns ``W x`` into ``g ⊙ (W x + B A x)``."""
    if isinstance(layer, VeraLinear):
        return (*layer.low_rank_factors(name), None)
    if isinstance(layer, LoraLinear):
        A, B = _lora_pair(layer, name)
        dora = name in getattr(layer, "lora_magnitude_vector", {})
        return A, B, layer.magnitude_scale(name) if dora else None
    raise ValueError(f"mixed batches route LoRA, DoRA and VeRA adapters on linear layers; {module_name} holds a "
                     f"{type(layer).__name__} for adapter {name!r}. Run that adapter in its own batch.")


def _expand(index: torch.Tensor, batch: int, device) -> torch.Tensor:
    """Row indices for a batch, following generate's in-place row repetition (beams, num_return_sequences)."""
    if batch % index.numel():
        raise ValueError(f"mixed_batch got {index.numel()} adapter names but the model received a batch of {batch} "
                         "rows; give one adapter name per row.")
    return index.repeat_interleave(batch // index.numel()).to(device)


class _RowRouter:
    """Forward hook of one layer: adds each row's own adapter via gathered factors and two batched matmuls."""

    @torch.no_grad()
    def __init__(self, layer: nn.Module, module_name: str, names: list[str], index: torch.Tensor) -> None:
        factors = [_row_factors(layer, module_name, n) if n in layer.adapter_names else None for n in names]
        ref = next(f[0] for f in factors if f is not None)
        r = max(f[0].shape[0] for f in factors if f is not None)
        out_features = next(f[1].shape[0] for f in factors if f is not None)
        self.A = ref.new_zeros(len(names) + 1, r, ref.shape[1])  # slot 0: no adapter
        self.B = ref.new_zeros(len(names) + 1, out_features, r)
        self.G = ref.new_ones(len(names) + 1, out_features) if any(f and f[2] is not None for f in factors) else None
        for k, f in enumerate(factors, 1):
            if f is not None:
                self.A[k, : f[0].shape[0]], self.B[k, :, : f[0].shape[0]] = f[0], f[1]
                if f[2] is not None:
                    self.G[k] = f[2]
        self.index, self.bias = index, layer.base_layer.bias

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        idx = _expand(self.index, x.shape[0], x.device)
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.A.dtype)  # (batch, seq, in)
        delta = torch.bmm(torch.bmm(xs, self.A[idx].transpose(1, 2)), self.B[idx].transpose(1, 2))  # (batch, seq, out)
        out = output.reshape(delta.shape)
        if self.G is not None:  # DoRA rows: g ⊙ (W x + B A x) − W x
            wx = (out if self.bias is None else out - self.bias).to(delta.dtype)
            delta = self.G[idx][:, None, :] * (wx + delta) - wx
        return (out + delta.to(out.dtype)).reshape(output.shape)


class _RowHeads:
    """Forward hook of a ``modules_to_save`` wrapper: each row through its adapter's copy (few adapters: a loop)."""

    def __init__(self, names: list[str], index: torch.Tensor) -> None:
        self.names, self.index = names, index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        idx = _expand(self.index, x.shape[0], x.device)
        output = output.clone()
        for k, name in enumerate(self.names, 1):
            rows = (idx == k).nonzero().squeeze(1)
            if rows.numel() and name in module.modules_to_save:
                output[rows] = module.modules_to_save[name](x[rows]).to(output.dtype)
        return output


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch runs adapter ``adapter_names[i]`` (``None`` or ``"__base__"``:
    the base model alone) — for ``model(...)`` and ``model.generate(...)`` alike.

    Inference only (no dropout; factors are read on entry). Each adapted layer gathers its rows'
    factors and runs two batched matmuls, with no Python loop over adapters. Works for LoRA, DoRA,
    LoRA-FA, LoRA+ and VeRA adapters on linear layers, and per-adapter head copies (modules_to_save).
    """
    rows = [None if n in (None, BASE) else n for n in adapter_names]
    used = list(dict.fromkeys(n for n in rows if n is not None))
    _check_known(model, used)
    state = get_state(model)
    for name in used:
        if isinstance(state.configs[name], DeltaLoraConfig):
            raise ValueError(f"adapter {name!r} is Delta-LoRA: it changed the base weights themselves, which a "
                             "mixed batch cannot undo per row. Run it on its own model copy.")
    layers, heads = list(tuner_layers(model)), list(saved_modules(model))
    merged = [n for n, layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError(f"{merged[0]} has merged adapters; mixed batches need unmerged ones: slimtune.unmerge(model).")
    index = torch.tensor([0 if n is None else used.index(n) + 1 for n in rows])
    routers = [(layer, _RowRouter(layer, n, used, index)) for n, layer in layers
               if any(a in layer.adapter_names for a in used)]  # built (and validated) before any change
    switchable = [m for _, m in layers] + [m for _, m in heads]
    previous = [m.disabled for m in switchable]
    handles = []
    try:
        for module in switchable:
            module.disabled = True
        handles += [layer.register_forward_hook(router, with_kwargs=True) for layer, router in routers]
        handles += [m.register_forward_hook(_RowHeads(used, index), with_kwargs=True) for _, m in heads]
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module, disabled in zip(switchable, previous):
            module.disabled = disabled
