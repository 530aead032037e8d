"""Where AdapterHub puts bottleneck adapters in a model, and what its weights are called there.

AdapterHub adapts each block at two locations: ``mh_adapter`` (after attention) and ``output_adapter``
(after the feed-forward block), at the sub-layer's output after its dropout:

- BERT family (post-norm): the wrapped modules are ``attention.output`` / ``output``, which get the residual
  as their ``input_tensor`` argument; AdapterHub's modules have the same paths.
- Llama family (pre-norm): ``self_attn`` / ``mlp``; the residual is the input of ``input_layernorm`` /
  ``post_attention_layernorm``; AdapterHub's modules are the block's ``attention_adapters`` / ``output_adapters``.
- GPT-2 (pre-norm): ``attn`` / ``mlp``; residual from ``ln_1`` / ``ln_2``; AdapterHub's modules as for Llama.

Weight keys: ``<AdapterHub path>.adapters.<name>.<parameter>`` and ``….adapter_fusion_layer.<name>.<parameter>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from slimtune.adapterhub.layers import HubSite
from slimtune.adapterhub.modules import BottleneckAdapter
from slimtune.core.modules import block_list, block_lists
from slimtune.core.state import AdapterState

HOOKS = "ADAPTERHUB_RESIDUAL_HOOKS"  # key of AdapterState.shared: site name → the norm's pre-hook


@dataclass(frozen=True)
class Architecture:
    family: str
    kind: str  # "post_norm" | "pre_norm" (see slimtune.adapterhub.layers)
    modules: tuple[str, str]  # the wrapped modules inside a block: (after attention, after the feed-forward block)
    norms: tuple[str, str] | None  # pre-norm: the norms whose inputs are the residuals
    hub_paths: tuple[str, str]  # AdapterHub's path of its adapter layer inside the block


ARCHITECTURES = (
    Architecture("llama", "pre_norm", ("self_attn", "mlp"), ("input_layernorm", "post_attention_layernorm"),
                 ("attention_adapters", "output_adapters")),
    Architecture("gpt2", "pre_norm", ("attn", "mlp"), ("ln_1", "ln_2"), ("attention_adapters", "output_adapters")),
    Architecture("bert", "post_norm", ("attention.output", "output"), None, ("attention.output", "output")),
)
LOCATIONS = ("mh_adapter", "output_adapter")


@dataclass(frozen=True)
class Site:
    name: str  # module path of the wrapped module
    index: int  # the block's index (AdapterHub's layer_idx)
    location: str  # "mh_adapter" | "output_adapter"
    kind: str
    norm: str | None  # pre-norm: module path of the norm whose input is the residual
    hub_path: str  # AdapterHub's module path of the site's adapter layer


def _child(block: nn.Module, path: str) -> nn.Module | None:
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return None
    return module.base_layer if isinstance(module, HubSite) else module


def _matches(block: nn.Module, arch: Architecture) -> bool:
    if any(_child(block, p) is None for p in arch.modules + (arch.norms or ())):
        return False
    if arch.kind == "post_norm":  # BERT's output modules: dense → dropout → LayerNorm
        return all(all(hasattr(_child(block, p), a) for a in ("dense", "dropout", "LayerNorm")) for p in arch.modules)
    return True


def find_sites(model: nn.Module) -> list[Site]:
    """Every AdapterHub site of ``model`` (both locations of every block), in model order."""
    lists = block_lists(model)
    if len(lists) != 1:
        raise ValueError(f"AdapterHub placement supports models with one list of blocks (BERT, GPT-2, Llama "
                         f"families); {type(model).__name__} has {lists}. Use placement='projection'.")
    sites = []
    for index, block in enumerate(block_list(model, lists[0])):
        arch = next((a for a in ARCHITECTURES if _matches(block, a)), None)
        if arch is None:
            children = [n for n, _ in block.named_children()]
            raise ValueError(f"AdapterHub placement knows BERT-, GPT-2- and Llama-style blocks; a "
                             f"{type(block).__name__} (children {children}) is none of them. Use "
                             "placement='projection'.")
        prefix = f"{lists[0]}.{index}"
        for k, location in enumerate(LOCATIONS):
            norm = f"{prefix}.{arch.norms[k]}" if arch.norms else None
            sites.append(Site(f"{prefix}.{arch.modules[k]}", index, location, arch.kind, norm,
                              f"{prefix}.{arch.hub_paths[k]}"))
    return sites


def hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{type(model).__name__} has no config.hidden_size, which AdapterHub's adapters are sized by.")
    return size


# ---- the residual of pre-norm blocks ------------------------------------------------------------------------
class ResidualTap:
    """Forward pre-hook of the norm before a pre-norm sub-layer: hands its input (the residual) to the site."""

    def __init__(self, site: HubSite) -> None:
        self.site = site

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.site.residual = args[0]


def attach(model: nn.Module, site: Site, layer: HubSite, state: AdapterState) -> None:
    """Hook the site's norm (pre-norm blocks) so ``layer`` sees the residual."""
    if site.norm is None:
        return
    hooks: dict[str, RemovableHandle] = state.shared.setdefault(HOOKS, {})
    if site.name not in hooks:
        hooks[site.name] = model.get_submodule(site.norm).register_forward_pre_hook(ResidualTap(layer))


def detach_stale(model: nn.Module, state: AdapterState) -> None:
    """Remove the hooks of sites that are no longer wrapped (their last adapter went)."""
    hooks: dict[str, RemovableHandle] = state.shared.get(HOOKS, {})
    modules = dict(model.named_modules())
    for name in [n for n in hooks if not isinstance(modules.get(n), HubSite)]:
        hooks.pop(name).remove()
    if not hooks:
        state.shared.pop(HOOKS, None)


# ---- AdapterHub's weight names ---------------------------------------------------------------------------------
def hub_tensors(model: nn.Module, adapter_name: str, hub_name: str, saving: bool = False
                ) -> dict[str, torch.Tensor]:
    """The live tensors of one adapter (or fusion adapter) under AdapterHub's keys, ``hub_name`` as its name.

    ``saving`` adds ``adapter_norm_before.*``, which AdapterHub registers twice (also as ``adapter_down.0``)."""
    paths = {s.name: s.hub_path for s in find_sites(model)}
    out: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, HubSite) or name not in paths:
            continue
        for attr in ("adapters", "adapter_fusion_layer"):
            container = getattr(layer, attr)
            if adapter_name not in container:
                continue
            module = container[adapter_name]
            for key, tensor in module.state_dict(keep_vars=True).items():
                out[f"{paths[name]}.{attr}.{hub_name}.{key}"] = tensor
            norm = module.adapter_down[0] if isinstance(module, BottleneckAdapter) else None
            if saving and isinstance(norm, nn.LayerNorm):
                out[f"{paths[name]}.adapters.{hub_name}.adapter_norm_before.weight"] = norm.weight
                out[f"{paths[name]}.adapters.{hub_name}.adapter_norm_before.bias"] = norm.bias
    return out


def align(stored: dict[str, torch.Tensor], expected: set[str], model: nn.Module, saved_name: str, hub_name: str,
          container: str) -> dict[str, torch.Tensor]:
    """``stored`` (a file's tensors) keyed like ``expected``: the saved adapter name replaced by ``hub_name``,
    ``adapter_norm_before.*`` duplicates dropped, and the base model's prefix (``bert.`` …) added or removed
    when the file was saved from a model with (or without) a head."""
    marker, wanted = f".{container}.{saved_name}.", f".{container}.{hub_name}."
    out = {k.replace(marker, wanted): v for k, v in stored.items() if ".adapter_norm_before." not in k}
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    if prefix and not set(out) & expected:
        if any(k.startswith(prefix + ".") for k in expected):
            out = {f"{prefix}.{k}": v for k, v in out.items()}
        else:
            out = {k.removeprefix(prefix + "."): v for k, v in out.items()}
    return out


# ---- the input copies of a Parallel composition --------------------------------------------------------------
PARALLEL_HOOK = "ADAPTERHUB_PARALLEL_HOOK"  # key of AdapterState.shared: the model's forward pre-hook


def drop_parallel_hook(state: AdapterState) -> None:
    """Stop copying the input (a new active set or composition replaces a Parallel one)."""
    handle = state.shared.pop(PARALLEL_HOOK, None)
    if handle is not None:
        handle.remove()
