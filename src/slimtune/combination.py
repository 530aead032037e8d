"""Combining LoRA adapters into one: exactly (concatenated factors) or as a best low-rank approximation.

    slimtune.combine_adapters(model, ["math", "code"], [0.7, 0.3], "mix")      # exact: ΔW = Σ wᵢ ΔWᵢ
    slimtune.combine_adapter_files(["a/", "b/"], [0.5, 0.5], "mix/", "svd", rank=16)   # without a model
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from slimtune.adapter_files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors
from slimtune.config import LoraConfig, MethodConfig
from slimtune.core.files import atomic_folder
from slimtune.core.state import get_state
from slimtune.lifecycle import add_adapter
from slimtune.methods import method_for
from slimtune.methods.contract import PEFT_PREFIX, tuner_layers
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lora_layers import LoraEmbedding, LoraLinear, lora_scaling
from slimtune.methods.targets import pattern_value

COMBINATION_TYPES = ("cat", "svd", "linear")
Factors = tuple[float, torch.Tensor, torch.Tensor, float]  # (weight wᵢ, Aᵢ (rᵢ, in), Bᵢ (out, rᵢ), scaling sᵢ)


def _factors(layer: TunerLayer, module_name: str, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    if layer.low_rank_factors(adapter_name) is None or not isinstance(layer, (LoraLinear, LoraEmbedding)):
        raise ValueError(f"{module_name}: adapter {adapter_name!r} is not a low-rank product there; only plain LoRA "
                         "adapters combine.")
    A, B = layer.lora_parameters(adapter_name)
    return A, B, layer.scaling[adapter_name]


def combine_factors(pairs: Sequence[Factors], combination_type: str = "cat",
                    rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA pair ``(A, B)``, to be used with scaling 1, from ``(wᵢ, Aᵢ, Bᵢ, sᵢ)``.

    ``"cat"``: exact ``Σ wᵢ sᵢ Bᵢ Aᵢ``, rank Σ rᵢ: ``A = [A₁; A₂; …]``, ``B = [w₁s₁B₁, w₂s₂B₂, …]``.
    ``"svd"``: the best rank-``rank`` approximation of it (Eckart–Young), from the QR factors of the exact
    pair, so no ``(out, in)`` matrix is built; zero-padded when the exact rank is lower.
    ``"linear"``: PEFT's task arithmetic on the factors (equal ranks): ``A = Σ ±√|wᵢsᵢ| Aᵢ``, ``B = Σ √|wᵢsᵢ| Bᵢ``
    (the sign of ``wᵢsᵢ`` on A); exact for one adapter, with cross terms ``Bᵢ Aⱼ`` for several.
    """
    if combination_type == "linear":
        ranks = {a.shape[0] for _, a, _, _ in pairs}
        if len(ranks) > 1:
            raise ValueError(f"combination_type='linear' adds the factors themselves, so every adapter needs the "
                             f"same rank; these have ranks {sorted(ranks)}. Use 'cat' (exact) or 'svd'.")
        roots = [(w * s, abs(w * s) ** 0.5) for w, _, _, s in pairs]
        A = sum((root if ws >= 0 else -root) * a.detach().float() for (ws, root), (_, a, _, _) in zip(roots, pairs))
        B = sum(root * b.detach().float() for (_, root), (_, _, b, _) in zip(roots, pairs))
        return torch.as_tensor(A), torch.as_tensor(B)
    A = torch.cat([a.detach().float() for _, a, _, _ in pairs])
    B = torch.cat([w * s * b.detach().float() for w, _, b, s in pairs], 1)
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
                       rank: int | None, configs: Sequence[MethodConfig]) -> list[LoraConfig]:
    """Raise unless these adapters combine as asked; return their configs (all plain LoRA)."""
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters {list(adapters)} but "
                         f"{len(weights)} weights {list(weights)}.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is not supported; use 'cat' (exact, rank Σ rᵢ), "
                         "'svd' (best approximation of a chosen rank) or 'linear' (PEFT's sum of the factors).")
    if combination_type == "svd" and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"combination_type='svd' needs rank=<positive int> (got rank={rank!r}).")
    if combination_type != "svd" and rank is not None:
        raise ValueError(f"rank={rank!r} only applies to combination_type='svd'; {combination_type!r} decides the "
                         "rank itself.")
    lora_configs: list[LoraConfig] = []
    for name, config in zip(adapters, configs):
        if not isinstance(config, LoraConfig) or config.use_dora or method_for(config).changes_base_weights:
            kind = "DoRA" if getattr(config, "use_dora", False) else config.peft_type
            raise ValueError(f"adapter {name!r} is {kind}: only plain LoRA adapters (ΔW = s B A) combine exactly. "
                             "Merge it instead, or combine LoRA adapters only.")
        if config.modules_to_save or config.bias != "none":
            raise ValueError(f"adapter {name!r} also trains biases or modules_to_save ({config.bias=}, "
                             f"{config.modules_to_save=}); those have no weighted combination.")
        lora_configs.append(config)
    bases = {c.base_model_name_or_path for c in configs if c.base_model_name_or_path is not None}
    if len(bases) > 1:
        raise ValueError(f"adapters {list(adapters)} were trained on different bases {sorted(bases)}; combine "
                         "adapters of one base model only.")
    return lora_configs


def _combined_config(template: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """A LoRA config with scaling 1 everywhere, exact per-module ranks and full module names as targets."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank; others by pattern
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern=dict(pattern), task_type=template.task_type,
                      base_model_name_or_path=template.base_model_name_or_path)


def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                     combination_type: str = "cat", rank: int | None = None, activate: bool = False) -> nn.Module:
    """Add ``adapter_name``: the LoRA adapter with ``ΔW = Σ wᵢ ΔWᵢ`` per module (see :func:`combine_factors`)."""
    state = get_state(model)
    state.check_known(list(adapters))
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick a new name for the combination.")
    configs = _check_combination(adapters, weights, combination_type, rank, [state.configs[a] for a in adapters])
    combined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_name, layer in tuner_layers(model):
        pairs = [(w, *_factors(layer, module_name, a)) for a, w in zip(adapters, weights) if a in layer.adapter_names]
        if pairs:
            combined[module_name] = combine_factors(pairs, combination_type, rank)
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
                         combination_type: str = "svd", svd_rank: int | None = None) -> nn.Module:
    """PEFT's name and defaults for :func:`combine_adapters`: ``"svd"`` unless told, its rank the largest of the
    adapters' ranks unless ``svd_rank`` is given. The new adapter is not activated (``set_adapter`` it)."""
    if combination_type == "svd" and svd_rank is None:
        known = get_state(model).configs
        configs = [known[a] for a in adapters if a in known]
        svd_rank = max((max([c.r, *c.rank_pattern.values()]) for c in configs if isinstance(c, LoraConfig)),
                       default=None)
    return combine_adapters(model, adapters, weights, adapter_name, combination_type,
                            svd_rank if combination_type == "svd" else None)


def combine_adapter_files(paths: Sequence[str | os.PathLike], weights: Sequence[float], output: str | os.PathLike,
                          combination_type: str = "cat", rank: int | None = None) -> Path:
    """:func:`combine_adapters` on saved LoRA adapters (PEFT's format), without loading a model."""
    configs = _check_combination([str(p) for p in paths], weights, combination_type, rank,
                                 [read_adapter_config(p) for p in paths])
    per_module: dict[str, list[Factors]] = {}
    shapes: dict[str, tuple[str, str, int, int]] = {}  # module → (first path, kind, in, out)
    for path, config, weight in zip(paths, configs, weights):
        for module, (kind, A, B, s) in _file_pairs(path, config).items():
            shape = (kind, A.shape[1], B.shape[0])
            first = shapes.setdefault(module, (str(path), *shape))
            if first[1:] != shape:
                raise ValueError(f"{module}: {path} adapts a {shape[0]} of (in, out) = {shape[1:]}, but {first[0]} one "
                                 f"of {first[2:]}; the adapters were trained for different model shapes.")
            per_module.setdefault(module, []).append((weight, A, B, s))
    tensors, ranks = {}, {}
    for module, pairs in per_module.items():
        A, B = combine_factors(pairs, combination_type, rank)
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if shapes[module][1] == "embedding" else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{module}.{a_key}"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.{b_key}"] = B.contiguous()
        ranks[module] = A.shape[0]
    folder = Path(output)
    data = {**_combined_config(configs[0], ranks).to_dict(), "inference_mode": True}
    with atomic_folder(folder) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_bytes((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return folder


def _file_pairs(path, config: LoraConfig) -> dict[str, tuple[str, torch.Tensor, torch.Tensor, float]]:
    """module → (kind, A, B, s) read from an adapter folder."""
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
    other = [k for k in tensors if not any(k == m + suffix for m in out for suffix in (
        ".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"))]
    if other:
        raise ValueError(f"{path} holds tensors that are not plain LoRA factors, e.g. {other[:2]}; only LoRA "
                         "adapters combine.")
    return out
