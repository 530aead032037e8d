"""Combining LoRA adapters into one: exactly (concatenated factors), as a best low-rank approximation, or by
PEFT's merging rules (task arithmetic, TIES, DARE, magnitude pruning; see :mod:`slimtune.core.task_arithmetic`).

    slimtune.combine_adapters(model, ["math", "code"], [0.7, 0.3], "mix")      # exact: ΔW = Σ wᵢ ΔWᵢ
    slimtune.combine_adapter_files(["a/", "b/"], [0.5, 0.5], "mix/", "svd", rank=16)   # without a model
    slimtune.add_weighted_adapter(model, ["a", "b"], [1, 1], "ab", "ties_svd", density=0.2)   # PEFT's call
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save
from torch import nn

from slimtune.adapter_files import (
    ADAPTER_FILES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_adapter_config,
    read_adapter_tensors,
)
from slimtune.config import LoraConfig, MethodConfig, config_json
from slimtune.core.files import atomic_folder, check_replaceable
from slimtune.core.state import get_state
from slimtune.core.task_arithmetic import MERGE_RULES, PRUNING_RULES, SIGN_METHODS, merge_task_tensors
from slimtune.lifecycle import add_adapter
from slimtune.methods import method_for
from slimtune.methods.contract import PEFT_PREFIX, tuner_layers
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lora_layers import LoraEmbedding, LoraLinear, lora_scaling
from slimtune.methods.targets import pattern_value

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *MERGE_RULES, *SVD_TYPES)
Factors = tuple[float, torch.Tensor, torch.Tensor, float]  # (weight wᵢ, Aᵢ (rᵢ, in), Bᵢ (out, rᵢ), scaling sᵢ)
# The fields a combined adapter's config sets itself (scaling 1, exact targets; the rest is the first adapter's)
REPLACED_FIELDS = frozenset({"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
                             "exclude_modules", "layers_to_transform", "layers_pattern", "inference_mode",
                             "init_lora_weights"})  # (the factors are set: an initialisation's rank rules do not apply)


@dataclass(frozen=True)
class Combination:
    """How adapters combine (PEFT's ``add_weighted_adapter`` types), checked on construction.

    ``cat``: exact ``ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ``, rank Σ rᵢ. ``svd``: its best rank-``rank`` approximation. The
    :data:`~slimtune.core.task_arithmetic.MERGE_RULES` (``linear``, ``ties``, ``dare_*``, ``magnitude_prune``) merge the
    A factors and the B factors separately, with weights ``±√|wᵢsᵢ|`` and ``√|wᵢsᵢ|`` (equal ranks; cross terms
    ``Bᵢ Aⱼ`` for several adapters). ``<rule>_svd`` merges the updates ``wᵢ sᵢ Bᵢ Aᵢ`` by the rule, then keeps the
    best rank-``rank`` approximation. ``svd_clamp`` (a quantile in (0, 1]) clips the SVD factors' entries.
    """

    type: str = "cat"
    rank: int | None = None
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None

    def __post_init__(self) -> None:
        kind = self.type
        if kind not in COMBINATION_TYPES:
            raise ValueError(f"combination_type={kind!r} is not supported; use one of {COMBINATION_TYPES}: 'cat' "
                             "(exact, rank Σ rᵢ), 'svd' (best approximation of a chosen rank), 'linear' (PEFT's sum "
                             "of the factors), 'ties', 'dare_linear', 'dare_ties', 'magnitude_prune', or one of "
                             "those with '_svd' (merge the weight updates, then truncate).")
        if kind in SVD_TYPES and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"combination_type={kind!r} needs rank=<positive int> (got rank={self.rank!r}).")
        if kind not in SVD_TYPES and self.rank is not None:
            raise ValueError(f"rank={self.rank!r} only applies to the SVD types {SVD_TYPES}; {kind!r} decides the "
                             "rank itself.")
        prunes = kind.removesuffix("_svd") in PRUNING_RULES
        if prunes and (not isinstance(self.density, (int, float)) or isinstance(self.density, bool)
                       or not 0 < self.density <= 1):
            raise ValueError(f"combination_type={kind!r} prunes the adapters: give density=<fraction of entries "
                             f"kept, in (0, 1]> (got density={self.density!r}).")
        if not prunes and self.density is not None:
            raise ValueError(f"density={self.density!r} only applies to the pruning types (ties, dare_linear, "
                             f"dare_ties, magnitude_prune and their _svd forms), not to {kind!r}.")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"majority_sign_method={self.majority_sign_method!r}; use one of {SIGN_METHODS}.")
        if self.svd_clamp is not None and (kind not in SVD_TYPES or not isinstance(self.svd_clamp, (int, float))
                                           or not 0 < self.svd_clamp <= 1):
            raise ValueError(f"svd_clamp={self.svd_clamp!r}: a quantile in (0, 1], for the SVD types {SVD_TYPES} "
                             f"only (combination_type={kind!r}).")


def _factors(layer: TunerLayer, module_name: str, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    if layer.low_rank_factors(adapter_name) is None or not isinstance(layer, (LoraLinear, LoraEmbedding)):
        raise ValueError(f"{module_name}: adapter {adapter_name!r} is not a low-rank product there; only plain LoRA "
                         "adapters combine.")
    A, B = layer.lora_parameters(adapter_name)
    return A, B, layer.scaling[adapter_name]


def _svd_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                 how: Combination) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_k (rank, in), B_k (out, rank))`` = ``(Vₖᵀ, Uₖ Sₖ)``, split as PEFT splits them, clamped if asked,
    zero-padded when the update has a lower rank than asked for."""
    rank = cast(int, how.rank)
    k = min(rank, s.numel())
    A_k, B_k = vh[:k], u[:, :k] * s[:k]
    if how.svd_clamp is not None:
        high = torch.quantile(torch.cat([B_k.flatten(), A_k.flatten()]), how.svd_clamp)
        A_k, B_k = A_k.clamp(-high, high), B_k.clamp(-high, high)
    pad = rank - k
    return torch.cat([A_k, A_k.new_zeros(pad, A_k.shape[1])]), torch.cat([B_k, B_k.new_zeros(B_k.shape[0], pad)], 1)


def _thin_svd(B: torch.Tensor, A: torch.Tensor, how: Combination) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_svd_factors` of ``B A`` from the QR factors of ``B`` and ``Aᵀ``: no ``(out, in)`` matrix is built."""
    q_b, r_b = torch.linalg.qr(B)  # B = Q_b R_b
    q_a, r_a = torch.linalg.qr(A.T)  # Aᵀ = Q_a R_a, so B A = Q_b (R_b R_aᵀ) Q_aᵀ
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return _svd_factors(q_b @ u, s, vh @ q_a.T, how)


def combine_factors(pairs: Sequence[Factors], how: Combination,
                    transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA pair ``(A, B)``, to be used with scaling 1, from ``(wᵢ, Aᵢ, Bᵢ, sᵢ)`` combined as ``how`` says.

    ``transposed``: the layer's weight update is pruned as ``(in, out)``, the layout PEFT prunes it in for
    embeddings and Conv1D, so that DARE's random draws fall on the same entries as PEFT's.
    """
    floats = [(w, a.detach().float(), b.detach().float(), s) for w, a, b, s in pairs]
    if how.type in MERGE_RULES:
        ranks = {a.shape[0] for _, a, _, _ in floats}
        if len(ranks) > 1:
            raise ValueError(f"combination_type={how.type!r} merges the factors themselves, so every adapter needs "
                             f"the same rank; these have ranks {sorted(ranks)}. Use 'cat' (exact) or an SVD type.")
        roots = [(abs(w * s) ** 0.5, w * s >= 0) for w, _, _, s in floats]
        merge = partial(merge_task_tensors, how.type, density=how.density,
                        majority_sign_method=how.majority_sign_method)
        A = merge([a for _, a, _, _ in floats], [root if positive else -root for root, positive in roots])
        return A, merge([b for _, _, b, _ in floats], [root for root, _ in roots])
    if how.type == "cat" or (how.type == "svd" and how.svd_clamp is None):
        A = torch.cat([w * s * a for w, a, _, s in floats])  # weight and scaling in A, where PEFT puts them: a
        B = torch.cat([b for _, _, b, _ in floats], 1)  # later combination by a factor rule then matches PEFT's
        return (A, B) if how.type == "cat" else _thin_svd(B, A, how)
    # The SVD of the (out, in) update, as PEFT computes it (a clamp depends on the signs LAPACK gives its vectors).
    updates = [s * b @ a for _, a, b, s in floats]
    rule = "linear" if how.type == "svd" else how.type.removesuffix("_svd")
    merged = merge_task_tensors(rule, [u.T if transposed else u for u in updates],
                                [w for w, _, _, _ in floats], how.density, how.majority_sign_method)
    merged = merged.T if transposed else merged
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    return _svd_factors(u, s, vh, how)


def _check_combination(adapters: Sequence[str], weights: Sequence[float], configs: Sequence[MethodConfig]
                       ) -> list[LoraConfig]:
    """Raise unless these adapters combine; return their configs (all plain LoRA)."""
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters {list(adapters)} but "
                         f"{len(weights)} weights {list(weights)}.")
    if bad := [(name, w) for name, w in zip(adapters, weights) if not _finite_number(w)]:
        raise ValueError(f"weight {bad[0][1]!r} of adapter {bad[0][0]!r} is not a finite number; give each adapter a "
                         "real weight (e.g. 0.5, or -1 to subtract it).")
    lora_configs: list[LoraConfig] = []
    for name, config in zip(adapters, configs):
        if not isinstance(config, LoraConfig) or config.use_dora or method_for(config).changes_base_weights:
            kind = "DoRA" if getattr(config, "use_dora", False) else config.peft_type
            raise ValueError(f"adapter {name!r} is {kind}: only plain LoRA adapters (ΔW = s B A) combine exactly. "
                             "Merge it instead, or combine LoRA adapters only.")
        if config.target_parameters:
            raise ValueError(f"adapter {name!r} adapts parameters (target_parameters={config.target_parameters}): "
                             "their per-expert factors have no weighted combination here (nor in PEFT). Merge it "
                             "instead (slimtune.merge_adapter), or combine adapters of target_modules only.")
        if config.modules_to_save or config.bias != "none":
            raise ValueError(f"adapter {name!r} also trains biases or modules_to_save ({config.bias=}, "
                             f"{config.modules_to_save=}); those have no weighted combination.")
        lora_configs.append(config)
    bases = {c.base_model_name_or_path for c in configs if c.base_model_name_or_path is not None}
    if len(bases) > 1:
        raise ValueError(f"adapters {list(adapters)} were trained on different bases {sorted(bases)}; combine "
                         "adapters of one base model only.")
    return lora_configs


def _finite_number(value: object) -> bool:
    try:
        return math.isfinite(float(cast(float, value)))
    except (TypeError, ValueError):
        return False


def _combined_config(template: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """A LoRA config with scaling 1 everywhere, exact per-module ranks and full module names as targets; the
    first adapter's other settings (dropout, layout, initialisation, task) carried over, as PEFT carries them."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank; others by pattern
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    kept = {f.name: getattr(template, f.name) for f in fields(LoraConfig) if f.name not in REPLACED_FIELDS}
    return LoraConfig(**kept, r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern=dict(pattern))


def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                     combination_type: str = "cat", rank: int | None = None, activate: bool = False, *,
                     density: float | None = None, majority_sign_method: str = "total",
                     svd_clamp: float | None = None) -> nn.Module:
    """Add ``adapter_name``: the adapters' LoRA updates per module combined as :class:`Combination` says
    (``"cat"``, the default, is exact: ``ΔW = Σ wᵢ ΔWᵢ``)."""
    how = Combination(combination_type, rank, density, majority_sign_method, svd_clamp)
    state = get_state(model)
    state.check_known(list(adapters))
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick a new name for the combination.")
    configs = _check_combination(adapters, weights, [state.configs[a] for a in adapters])
    combined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_name, layer in tuner_layers(model):
        pairs = [(w, *_factors(layer, module_name, a)) for a, w in zip(adapters, weights) if a in layer.adapter_names]
        if pairs:
            transposed = isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False)
            combined[module_name] = combine_factors(pairs, how, transposed)
    add_adapter(model, _combined_config(configs[0], {m: a.shape[0] for m, (a, _) in combined.items()}),
                adapter_name, activate=activate)
    with torch.no_grad():
        for module_name, (A, B) in combined.items():
            lora_layer = model.get_submodule(module_name)
            assert isinstance(lora_layer, (LoraLinear, LoraEmbedding))  # the combination is a LoRA adapter
            A_live, B_live = lora_layer.lora_parameters(adapter_name)  # scaling is 1: A and B go in as they are
            A_live.copy_(A)
            B_live.copy_(B)
    return model


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> nn.Module:
    """PEFT's name, arguments and defaults for :func:`combine_adapters`: ``"svd"`` unless told; an SVD type's rank
    is the largest of the adapters' ranks unless ``svd_rank`` is given; a single adapter is combined ``"linear"``
    (exactly), whatever the type. The new adapter is not activated (``set_adapter`` it).

    ``svd_full_matrices`` and ``svd_driver`` are accepted for PEFT's signature: only the leading ``rank`` singular
    vectors are kept, which neither changes, so they do not change the result.
    """
    del svd_full_matrices, svd_driver
    known = get_state(model).configs
    get_state(model).check_known(list(adapters))
    configs = _check_combination(adapters, weights, [known[a] for a in adapters])
    svd = combination_type in SVD_TYPES
    unused = {"density": None if combination_type.removesuffix("_svd") in PRUNING_RULES else density,
              "svd_clamp": None if svd else svd_clamp, "svd_rank": None if svd else svd_rank}
    if (unused := {k: v for k, v in unused.items() if v is not None}) and combination_type in COMBINATION_TYPES:
        warnings.warn(f"{unused} do nothing for combination_type={combination_type!r} (PEFT ignores them too); leave "
                      "them out.", stacklevel=2)
        density = None if "density" in unused else density
        svd_clamp = None if "svd_clamp" in unused else svd_clamp
    if len(adapters) == 1:
        combination_type, density, svd_clamp = "linear", None, None
    rank = None
    if combination_type in SVD_TYPES:
        rank = svd_rank or max(max([c.r, *c.rank_pattern.values()]) for c in configs)
    return combine_adapters(model, adapters, weights, adapter_name, combination_type, rank, density=density,
                            majority_sign_method=majority_sign_method, svd_clamp=svd_clamp)


def combine_adapter_files(paths: Sequence[str | os.PathLike], weights: Sequence[float], output: str | os.PathLike,
                          combination_type: str = "cat", rank: int | None = None, *, density: float | None = None,
                          majority_sign_method: str = "total", svd_clamp: float | None = None) -> Path:
    """:func:`combine_adapters` on saved LoRA adapters (PEFT's format), without loading a model."""
    how = Combination(combination_type, rank, density, majority_sign_method, svd_clamp)
    check_replaceable(output, ADAPTER_FILES.__contains__, paths, "the combined adapter")
    configs = _check_combination([str(p) for p in paths], weights, [read_adapter_config(p) for p in paths])
    per_module: dict[str, list[Factors]] = {}
    shapes: dict[str, tuple[str, str, int, int]] = {}  # module → (first path, kind, in, out)
    carried: dict[str, tuple[str, torch.Tensor]] = {}  # base weight key → (first path, tensor)
    for path, config, weight in zip(paths, configs, weights):
        file_pairs, base_weights = _file_pairs(path, config)
        for key, tensor in base_weights.items():
            first_path, kept = carried.setdefault(key, (str(path), tensor))
            if kept.shape != tensor.shape or not torch.equal(kept, tensor):
                raise ValueError(f"{path} and {first_path} hold different copies of the base weight {key} (a "
                                 "resized vocabulary?); combine adapters of one base model only.")
        for module, (kind, A, B, s) in file_pairs.items():
            shape = (kind, A.shape[1], B.shape[0])
            first = shapes.setdefault(module, (str(path), *shape))
            if first[1:] != shape:
                raise ValueError(f"{module}: {path} adapts a {shape[0]} of (in, out) = {shape[1:]}, but {first[0]} one "
                                 f"of {first[2:]}; the adapters were trained for different model shapes.")
            per_module.setdefault(module, []).append((weight, A, B, s))
    tensors, ranks = {}, {}
    layouts = {c.fan_in_fan_out for c in configs}
    if len(layouts) > 1 and how.type.startswith("dare"):  # DARE's draws fall on the layer's layout
        raise ValueError(f"the adapters' configs disagree on fan_in_fan_out ({[c.fan_in_fan_out for c in configs]}): "
                         "DARE prunes in the layers' layout (true for GPT-2's Conv1D); set it to the layers' in every "
                         "adapter_config.json (slimtune before 2026-12 wrote false for GPT-2).")
    transposed_layout = configs[0].fan_in_fan_out
    for module, pairs in per_module.items():
        embedding = shapes[module][1] == "embedding"
        A, B = combine_factors(pairs, how, embedding or transposed_layout)
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{module}.{a_key}"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.{b_key}"] = B.contiguous()
        ranks[module] = A.shape[0]
    tensors.update({f"{PEFT_PREFIX}{key}": tensor.contiguous() for key, (_, tensor) in carried.items()})
    folder = Path(output)
    data = {**_combined_config(configs[0], ranks).to_dict(), "inference_mode": True}
    with atomic_folder(folder) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_bytes((config_json(data) + "\n").encode())
    return folder


def _file_pairs(path, config: LoraConfig) -> tuple[dict[str, tuple[str, torch.Tensor, torch.Tensor, float]],
                                                    dict[str, torch.Tensor]]:
    """(module → (kind, A, B, s), base weights) read from an adapter folder. The base weights are those PEFT saves
    beside the factors of an adapted embedding or output layer (``save_embedding_layers``: a resized vocabulary)."""
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in read_adapter_tensors(path).items()}
    out = {}
    for key, A in tensors.items():
        for kind, a_suffix, b_suffix in (("linear", ".lora_A.weight", ".lora_B.weight"),
                                         ("embedding", ".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suffix):
                module = key.removesuffix(a_suffix)
                alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
                s = lora_scaling(alpha, A.shape[0], config.use_rslora)
                out[module] = (kind, A, tensors[module + b_suffix], s)
    factors = {m + suffix for m in out for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A",
                                                       ".lora_embedding_B")}
    base = {k: v for k, v in tensors.items() if k not in factors
            and any(k in (f"{m}.base_layer.weight", f"{m}.base_layer.bias") for m in out)}
    other = [k for k in tensors if k not in factors and k not in base]
    if other:
        raise ValueError(f"{path} holds tensors that are not plain LoRA factors, e.g. {other[:2]}; only LoRA "
                         "adapters combine.")
    return out, base
