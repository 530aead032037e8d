"""Merging several adapters' tensors into one: task arithmetic, TIES, DARE and magnitude pruning.

Each rule takes same-shaped task tensors ``τᵢ`` (LoRA factors, or whole weight updates) and weights ``wᵢ``:

- ``linear`` (task arithmetic, Ilharco et al. 2023): ``Σ wᵢ τᵢ``.
- ``magnitude_prune``: each ``τᵢ`` keeps its ``⌊density · n⌋`` largest-magnitude entries, then ``Σ wᵢ τᵢ``.
- ``ties`` (TIES-Merging, Yadav et al. 2023): prune by magnitude, elect each entry's sign (``total``: the sign of
  ``Σ τᵢ``; ``frequency``: the sign most tensors have), then average the weighted entries that agree with it.
- ``dare_linear`` / ``dare_ties`` (DARE, Yu et al. 2023): drop each entry with probability ``1 - density`` and
  rescale the survivors by ``1 / density``, then ``linear`` / TIES' sign election.

These are the rules of PEFT's ``add_weighted_adapter``. DARE draws from torch's global generator, tensor by tensor
in PEFT's order and layout (the same generator states drop the same entries); ``torch.manual_seed`` makes a
combination reproducible. PEFT draws the new adapter's initial weights before it prunes, so one seed does not give
both libraries the same drops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MERGE_RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING_RULES = MERGE_RULES[1:]  # every rule but linear needs a density
SIGN_METHODS = ("total", "frequency")


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``⌊density · numel⌋`` largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[tensor.abs().flatten().topk(int(density * tensor.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def prune_at_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and rescaled by ``1 / density`` (the expectation holds)."""
    if density >= 1:
        return tensor
    kept = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * kept / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Where each task tensor (stacked on dim 0) agrees with the elected sign of its entry (0 counts as +)."""
    signs = stacked.sign()
    votes = stacked.sum(0) if method == "total" else signs.sum(0)
    return signs == torch.where(votes >= 0, 1.0, -1.0)


def merge_task_tensors(rule: str, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                       density: float | None = None, majority_sign_method: str = "total") -> torch.Tensor:
    """One tensor from ``tensors`` (all one shape) and their ``weights`` by ``rule`` (one of :data:`MERGE_RULES`)."""
    if rule not in MERGE_RULES:
        raise ValueError(f"merge rule {rule!r} is not one of {MERGE_RULES}.")
    if rule in PRUNING_RULES:
        if density is None:
            raise ValueError(f"the {rule!r} rule prunes: give density=<fraction kept, in (0, 1]>.")
        prune = prune_at_random if rule.startswith("dare") else prune_by_magnitude
        tensors = [prune(t, density) for t in tensors]
    stacked = torch.stack(list(tensors))  # (n, *shape)
    weighted = stacked * torch.tensor(list(weights), dtype=stacked.dtype,
                                      device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if rule not in ("ties", "dare_ties"):
        return weighted.sum(0)
    agrees = majority_sign_mask(stacked, majority_sign_method)
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)
