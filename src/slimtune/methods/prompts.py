"""What prompt tuning, P-tuning and prefix tuning share: config fields, the prompt modules' home on
the model, and the forward pre-hooks that apply a prompt without a wrapper model.

slimtune edits the model in place, so there is no wrapper model to prepend a prompt: a forward
pre-hook on the model rewrites each call for the active prompt adapter (its config's
``rewrite_inputs``), and for encoder-decoder models a hook on ``model.get_encoder()`` — which
``generate`` calls directly — applies ``rewrite_encoder_inputs``. One prompt module per adapter lives
in ``model.prompt_encoder`` (PEFT's name); on disk each adapter is PEFT's single ``prompt_embeddings``
tensor. See :mod:`slimtune.methods.prompt_tuning` and :mod:`slimtune.methods.prefix`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimtune.compat import get_cache
from slimtune.config import MethodConfig, _check_str_list

PROMPT_CONTAINER = "prompt_encoder"  # model attribute holding one prompt module per adapter (PEFT's name)
_HOOKS = "_slimtune_prompt_hooks"


def _check_positive(name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer" + (" or None (read from the model)."
                                                                            if optional else "."))


@dataclass
class PromptLearningConfig(MethodConfig):
    """Fields PEFT's prompt-learning methods share. Sizes left at None are read from the model at
    injection and written into this config (as PEFT does), so the saved config is complete."""

    # PEFT keys head copies of prompt-learning adapters as ``base_model.<path>`` (no ``.model``).
    saved_modules_prefix: ClassVar[str] = "base_model."

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) \
                or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive integer "
                             "(how many virtual tokens to learn, e.g. 20).")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            _check_positive(name, getattr(self, name))
        self.modules_to_save = default_head(self.task_type, self.modules_to_save)

    # ---- hooks the injector calls ---------------------------------------------------------------
    def inject_into(self, model: nn.Module, adapter_name: str) -> None:
        self.check_model(model)
        module = self.build_module(model)
        container = getattr(model, PROMPT_CONTAINER, None)
        if container is None:
            container = nn.ModuleDict()
            setattr(model, PROMPT_CONTAINER, container)
        container[adapter_name] = module.to(model.get_input_embeddings().weight.device)
        _install_hooks(model, self)

    def adapter_tensors(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": getattr(model, PROMPT_CONTAINER)[adapter_name].to_save()}

    def remove_from(self, model: nn.Module, adapter_name: str | None) -> None:
        container = getattr(model, PROMPT_CONTAINER, None)
        if container is not None and adapter_name in container:
            del container[adapter_name]
        if container is not None and (adapter_name is None or not len(container)):
            delattr(model, PROMPT_CONTAINER)
        if not hasattr(model, PROMPT_CONTAINER):
            for handle in model.__dict__.pop(_HOOKS, {}).values():
                handle.remove()

    def set_active(self, model: nn.Module, adapter_names: list[str]) -> None:
        container = getattr(model, PROMPT_CONTAINER)
        prompts = [a for a in adapter_names if a in container]
        if len(prompts) > 1:
            raise ValueError(f"only one prompt-learning adapter can be active at a time, got {prompts}; "
                             "activate one of them (virtual tokens of several prompts do not compose).")
        for name, module in container.items():
            module.requires_grad_(name in prompts)

    def set_disabled(self, model: nn.Module, disabled: bool) -> None:
        """Inside ``disable_adapters`` the forward hooks leave every call as it is."""
        model.__dict__["_slimtune_prompts_disabled"] = disabled

    def merge(self, model: nn.Module, adapter_names: list[str]) -> None:
        from slimtune.methods.base import NotMergeableError

        container = getattr(model, PROMPT_CONTAINER, {})
        merged = [a for a in adapter_names if a in container and model.slimtune_state.configs[a] is self]
        if merged:
            raise NotMergeableError(f"{self.peft_type} adapter(s) {merged} add virtual tokens and cannot be merged "
                                    "into the weights; keep the adapter on the model (or save it) instead.")

    # ---- per-method parts -----------------------------------------------------------------------
    def build_module(self, model: nn.Module) -> nn.Module:
        """The prompt module of this method (each method defines it)."""
        raise NotImplementedError

    def input_module(self, model: nn.Module) -> nn.Module:
        """The module whose forward calls :meth:`rewrite_inputs` rewrites (the model itself by default)."""
        return model

    def rewrite_inputs(self, model: nn.Module, module: nn.Module, kwargs: dict) -> dict:
        """The forward call's keyword arguments with this method's prompt applied (each method defines it)."""
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> None:
        """Raise if this method cannot run on ``model`` (called before the model is changed); read the
        sizes left at None from the model."""
        if not callable(getattr(model, "get_input_embeddings", None)) or getattr(model, "config", None) is None:
            raise TypeError(f"{self.peft_type} needs a transformers model (with .config and get_input_embeddings()); "
                            f"got {type(model).__name__}.")
        if "inputs_embeds" not in _forward_params(model) and not model.config.is_encoder_decoder:
            raise TypeError(f"{type(model).__name__}.forward takes no inputs_embeds, so virtual tokens cannot be "
                            "prepended; use LoRA or (IA)³ on this model.")
        self._fill_dims(model)

    def _fill_dims(self, model: nn.Module) -> None:
        dims = model_dims(model)
        for name in ("num_layers", "token_dim", "num_attention_heads"):
            if getattr(self, name) is None:
                if dims[name] is None:
                    raise ValueError(f"cannot read {name} from {type(model.config).__name__}; set {name} in the config.")
                setattr(self, name, dims[name])
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == "SEQ_2_SEQ_LM" else 1


def default_head(task_type: str | None, modules_to_save: list[str] | None) -> list[str] | None:
    """PEFT trains a copy of the classification head for SEQ_CLS unless told otherwise (``[]`` = no head)."""
    modules_to_save = _check_str_list("modules_to_save", modules_to_save, allow_str=False)
    if task_type == "SEQ_CLS" and modules_to_save is None:
        return ["classifier", "score"]
    return modules_to_save


def model_dims(model: nn.Module) -> dict[str, int | None]:
    """Layer count, hidden size and head count from a transformers config (any naming)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

    def first(*names: str) -> int | None:
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    return {
        "num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": first("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": first("num_attention_heads", "n_head", "num_heads"),
        "num_key_value_heads": first("num_key_value_heads"),
        "head_dim": first("head_dim"),
    }


# ---- the forward pre-hooks ------------------------------------------------------------------------
def _forward_params(module: nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(module.forward).parameters)


def _as_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of ``module.forward`` turned into keyword arguments."""
    if not args:
        return dict(kwargs)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [n for n, p in _forward_params(module).items() if p.kind in kinds]
    return {**dict(zip(names, args)), **kwargs}


def active_prompt(model: nn.Module) -> tuple[str, PromptLearningConfig, nn.Module] | None:
    state = model.__dict__.get("slimtune_state")
    container = getattr(model, PROMPT_CONTAINER, None)
    if state is None or container is None or getattr(model, "_slimtune_prompts_disabled", False):
        return None
    name = next((a for a in state.active if a in container), None)
    return None if name is None else (name, state.configs[name], container[name])


def _install_hooks(model: nn.Module, config: PromptLearningConfig) -> None:
    """Forward pre-hooks that let the active prompt adapter rewrite calls: on the module whose inputs
    ``config`` rewrites (the model, or its backbone) and, for encoder-decoder models, on the encoder."""
    handles = model.__dict__.setdefault(_HOOKS, {})
    targets = [(config.input_module(model), "inputs")]
    if model.config.is_encoder_decoder:
        targets.append((model.get_encoder(), "encoder"))
    for module, role in targets:
        if id(module) not in handles:
            hook = functools.partial(_rewrite_call, model, role)
            handles[id(module)] = module.register_forward_pre_hook(hook, with_kwargs=True)


def _rewrite_call(model: nn.Module, role: str, module: nn.Module, args: tuple, kwargs: dict):
    active = active_prompt(model)
    if active is None:
        return None
    _, config, prompt = active
    if role == "encoder":
        if not hasattr(config, "rewrite_encoder_inputs"):
            return None
        return (), config.rewrite_encoder_inputs(model, prompt, _as_kwargs(module, args, kwargs))
    if config.input_module(model) is not module:
        return None
    return (), config.rewrite_inputs(model, prompt, _as_kwargs(module, args, kwargs))


def is_decoding(kwargs: dict) -> bool:
    """True on a cached step: the key/value cache already holds the prompt (or prefix)."""
    cache = get_cache(kwargs)
    return cache is not None and callable(getattr(cache, "get_seq_length", None)) and cache.get_seq_length() > 0


def pad_left(tensor: torch.Tensor | None, p: int, value: int | float) -> torch.Tensor | None:
    """``tensor`` (batch, seq) with ``p`` columns of ``value`` in front."""
    if tensor is None:
        return None
    if tensor.dim() != 2:
        raise ValueError(f"prompt-learning adapters need 2-D (batch, seq) masks and ids, got shape {tuple(tensor.shape)}; "
                         "a static or compiled cache builds 4-D masks, use the default dynamic cache.")
    pad = torch.full((tensor.shape[0], p), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


def shift_positions(kwargs: dict, p: int, prepend: bool) -> None:
    """Real tokens move ``p`` positions right; with ``prepend`` the virtual tokens take the ``p`` before them.

    Covers ``position_ids`` (batch, seq) and ``cache_position`` (seq,), which transformers 4.x's
    ``generate`` passes and derives positions and masks from."""
    for key in ("position_ids", "cache_position"):
        positions = kwargs.get(key)
        if positions is None:
            continue
        shifted = positions + p
        if prepend:
            virtual = torch.arange(p, device=positions.device, dtype=positions.dtype)  # an uncached call starts at 0
            shifted = torch.cat([virtual.expand(*positions.shape[:-1], p), shifted], dim=-1)
        kwargs[key] = shifted


# ---- prompt modules -------------------------------------------------------------------------------
class PromptModule(nn.Module):
    """Holds ``embedding`` (+ optional encoder heads); ``forward()`` gives the prompt rows."""

    head_names: tuple[str, ...] = ()

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """The encoder heads applied to the embedding rows (methods with heads override this)."""
        return rows

    def has_heads(self) -> bool:
        return any(hasattr(self, n) for n in self.head_names)

    def forward(self) -> torch.Tensor:
        rows = self.embedding.weight
        return self.encode(rows) if self.has_heads() else rows

    def to_save(self) -> torch.Tensor:
        """What PEFT saves: the encoder's output (the live embedding itself when there is no encoder)."""
        if not self.has_heads():
            return self.embedding.weight
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self.forward()
        self.train(was_training)
        return out

    @torch.no_grad()
    def fold(self) -> None:
        """Replace embedding + encoder by one embedding holding the encoder's output (inference form)."""
        if not self.has_heads():
            return
        trainable = self.embedding.weight.requires_grad
        rows = self.to_save().clone()
        for name in self.head_names:
            if hasattr(self, name):
                delattr(self, name)
        self.embedding = nn.Embedding.from_pretrained(rows, freeze=not trainable)


def fold_prompt_encoder(model: nn.Module, adapter_name: str = "default") -> None:
    """Drop a P-tuning encoder (or prefix-tuning MLP) after training, keeping its output as the prompt."""
    container = getattr(model, PROMPT_CONTAINER, None)
    if container is None or adapter_name not in container:
        raise ValueError(f"{adapter_name!r} is not a prompt-learning adapter of this model; "
                         f"those are {list(container or [])}.")
    container[adapter_name].fold()
