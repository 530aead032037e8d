"""What prompt tuning, P-tuning and prefix tuning share: config fields, the prompt modules' home on
the model, and the forward pre-hooks that apply a prompt without a wrapper model.

slimtune edits the model in place, so there is no wrapper model to prepend a prompt: a forward
pre-hook rewrites each call for the active prompt adapter (its method's ``rewrite_inputs``) on the
module whose inputs the method changes (the model, or its backbone), and for encoder-decoder models a
hook on ``model.get_encoder()`` — which ``generate`` calls directly — applies
``rewrite_encoder_inputs``. One prompt module per adapter lives in ``model.prompt_encoder`` (PEFT's
name); on disk each adapter is PEFT's single ``prompt_embeddings`` tensor. See
:mod:`slimtune.methods.prompt_tuning` and :mod:`slimtune.methods.prefix`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from slimtune.compat import forward_parameters, get_cache
from slimtune.config import MethodConfig, check_positive_int, default_head
from slimtune.core.modules import weight_of
from slimtune.core.state import AdapterState, find_state
from slimtune.errors import NotMergeableError
from slimtune.methods.contract import Method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PROMPT_CONTAINER = "prompt_encoder"  # model attribute holding one prompt module per adapter (PEFT's name)


@dataclass
class PromptLearningConfig(MethodConfig):
    """Fields PEFT's prompt-learning methods share. Sizes left at None are read from the model when the
    adapter is added and written into this config (as PEFT does), so the saved config is complete."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens,
                           hint=" (how many virtual tokens to learn, e.g. 20)")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            check_positive_int(name, getattr(self, name), optional=True)
        self.modules_to_save = default_head(self.task_type, self.modules_to_save)


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """``model`` typed as the transformers model that prompt methods run on (it has ``config``,
    ``get_input_embeddings()`` …: :meth:`PromptLearningMethod.check`); the object itself, unchanged."""
    return cast("PreTrainedModel", model)


def model_dims(model: nn.Module) -> dict[str, int | None]:
    """Layer count, hidden size and head count from a transformers config (any naming)."""
    config = transformers_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> int | None:
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    return {
        "num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": first("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": first("num_attention_heads", "n_head", "num_heads"),
        "num_key_value_heads": first("num_key_value_heads") or cached_heads_without_the_field(config),
        "head_dim": first("head_dim"),
    }


def cached_heads_without_the_field(config: Any) -> int | None:
    """Key/value heads in the cache of models whose config has no ``num_key_value_heads`` (Falcon): multi-query
    attention (Falcon-7B's layout) caches one head, Falcon's new decoder architecture every query head (its
    keys are broadcast before the cache); None elsewhere (as many as the attention heads)."""
    if getattr(config, "new_decoder_architecture", False):
        return getattr(config, "num_attention_heads", None)
    return 1 if getattr(config, "multi_query", False) else None


# Class-name endings of transformers' task heads → PEFT's task type (checked in this order).
HEAD_CLASS_TASKS = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
              ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"))


def task_type_of(model: nn.Module) -> str:
    """PEFT's task type for a transformers model, from its head class (an encoder-decoder generates: SEQ_2_SEQ_LM;
    a model without a head: FEATURE_EXTRACTION)."""
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and "Classification" not in name \
            and "QuestionAnswering" not in name:
        return "SEQ_2_SEQ_LM"
    for ending, task_type in HEAD_CLASS_TASKS:
        if name.endswith(ending):
            return task_type
    if name.endswith("Model") and "For" not in name:
        return "FEATURE_EXTRACTION"
    raise ValueError(f"cannot tell the task of a {name}; set task_type in the config to one of CAUSAL_LM, "
                     "SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS or FEATURE_EXTRACTION.")


class PromptLearningMethod(Method):
    """Shared steps of the prompt-learning methods; each says how to build its prompt module and how it
    rewrites a forward call (:meth:`build_module`, :meth:`rewrite_inputs`)."""

    # PEFT keys head copies of prompt-learning adapters as ``base_model.<path>`` (no ``.model``).
    saved_modules_prefix: ClassVar[str] = "base_model."

    # ---- what each prompt method defines --------------------------------------------------------------
    def build_module(self, model: nn.Module, config: PromptLearningConfig) -> PromptModule:
        raise NotImplementedError

    def rewrite_inputs(self, model: nn.Module, config: PromptLearningConfig, prompt: PromptModule,
                       kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward call's keyword arguments with the prompt applied."""
        raise NotImplementedError

    def rewrite_encoder_inputs(self, model: nn.Module, config: PromptLearningConfig, prompt: PromptModule,
                               kwargs: dict[str, Any]) -> dict[str, Any]:
        """For encoder-decoder models: the encoder's call (unchanged unless the method prompts the encoder)."""
        return kwargs

    def input_module(self, model: nn.Module) -> nn.Module:
        """The module whose forward calls :meth:`rewrite_inputs` rewrites (the model itself by default)."""
        return model

    # ---- the contract ---------------------------------------------------------------------------------
    def check(self, model: nn.Module, config: MethodConfig) -> None:
        """Raise if this method cannot run on ``model``; read the sizes left at None from the model."""
        assert isinstance(config, PromptLearningConfig)
        if not callable(getattr(model, "get_input_embeddings", None)) or getattr(model, "config", None) is None:
            raise TypeError(f"{config.peft_type} needs a transformers model (with .config and "
                            f"get_input_embeddings()); got {type(model).__name__}.")
        if "inputs_embeds" not in forward_parameters(model) and not transformers_model(model).config.is_encoder_decoder:
            raise TypeError(f"{type(model).__name__}.forward takes no inputs_embeds, so virtual tokens cannot be "
                            "prepended; use LoRA or (IA)³ on this model.")
        self.fill_dims(model, config)

    def fill_dims(self, model: nn.Module, config: PromptLearningConfig) -> None:
        if config.task_type is None:  # PEFT needs it to apply the prompt: a file without it loads as no prompt
            config.task_type = task_type_of(model)
            config.modules_to_save = default_head(config.task_type, config.modules_to_save)
        dims = model_dims(model)
        for name in ("num_layers", "token_dim", "num_attention_heads"):
            if getattr(config, name) is None:
                if dims[name] is None:
                    raise ValueError(f"cannot read {name} from {type(model.config).__name__}; set {name} in the "
                                     "config.")
                setattr(config, name, dims[name])
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
        elif config.task_type != "SEQ_2_SEQ_LM" and config.num_transformer_submodules != 1:
            raise ValueError(f"num_transformer_submodules={config.num_transformer_submodules} is for "
                             "encoder-decoder models (a prompt for the encoder and one for the decoder); a "
                             f"{config.task_type} model takes one prompt: leave num_transformer_submodules unset.")

    def add(self, model: nn.Module, config: MethodConfig, adapter_name: str, state: AdapterState) -> None:
        assert isinstance(config, PromptLearningConfig)
        module = self.build_module(model, config)
        container = getattr(model, PROMPT_CONTAINER, None)
        if container is None:
            container = nn.ModuleDict()
            setattr(model, PROMPT_CONTAINER, container)
        container[adapter_name] = module.to(weight_of(transformers_model(model).get_input_embeddings()).device)
        self._install_hooks(model, state)

    def remove(self, model: nn.Module, adapter_name: str, state: AdapterState) -> None:
        container = getattr(model, PROMPT_CONTAINER, None)
        if container is not None and adapter_name in container:
            del container[adapter_name]
        if container is not None and not len(container):
            delattr(model, PROMPT_CONTAINER)
        if not state.adapters_of(self.peft_type):  # this method's last adapter is gone: so are its hooks
            for handle in state.shared.pop(self.peft_type, {}).values():
                handle.remove()

    def check_active(self, model: nn.Module, adapter_names: list[str], state: AdapterState) -> None:
        prompts = [a for a in adapter_names if a in getattr(model, PROMPT_CONTAINER)]
        if len(prompts) > 1:
            raise ValueError(f"only one prompt-learning adapter can be active at a time, got {prompts}; "
                             "activate one of them (virtual tokens of several prompts do not compose).")

    def set_active(self, model: nn.Module, adapter_names: list[str], state: AdapterState) -> None:
        self.check_active(model, adapter_names, state)
        container = getattr(model, PROMPT_CONTAINER)
        prompts = [a for a in adapter_names if a in container]
        for name, module in container.items():
            if state.configs[name].peft_type == self.peft_type:
                module.requires_grad_(name in prompts)

    def merge(self, model: nn.Module, adapter_names: list[str], state: AdapterState) -> None:
        raise NotMergeableError(f"{self.peft_type} adapter(s) {adapter_names} add virtual tokens and cannot be "
                                "merged into the weights; keep the adapter on the model (or save it) instead.")

    def adapter_tensors(self, model: nn.Module, adapter_name: str, state: AdapterState) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": getattr(model, PROMPT_CONTAINER)[adapter_name].to_save()}

    # ---- the forward pre-hooks ------------------------------------------------------------------------
    def _install_hooks(self, model: nn.Module, state: AdapterState) -> None:
        """Hooks on the module whose inputs this method rewrites and, for encoder-decoder models, the encoder;
        kept in the state under this method's peft_type."""
        handles = state.shared.setdefault(self.peft_type, {})
        targets = [(self.input_module(model), "inputs")]
        hf_model = transformers_model(model)
        if hf_model.config.is_encoder_decoder:
            targets.append((hf_model.get_encoder(), "encoder"))
        for module, role in targets:
            if role not in handles:
                hook = functools.partial(self._rewrite_call, model, role)
                handles[role] = module.register_forward_pre_hook(hook, with_kwargs=True)

    def _rewrite_call(self, model: nn.Module, role: str, module: nn.Module, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> tuple[tuple[()], dict[str, Any]] | None:
        active = active_prompt(model)
        if active is None or active[1].peft_type != self.peft_type:
            return None
        _, config, prompt = active
        call = as_kwargs(module, args, kwargs)
        check_call(call, config.peft_type)
        if role == "encoder":
            return (), self.rewrite_encoder_inputs(model, config, prompt, call)
        return (), self.rewrite_inputs(model, config, prompt, call)


def check_call(kwargs: dict[str, Any], peft_type: str) -> None:
    """Refuse what a prompt-learning adapter cannot grow by its virtual tokens: a fixed-size (static, compilable)
    cache has no slots for them, and a prepared mask (4-D, or one per layer type) no columns."""
    cache = get_cache(kwargs)
    if cache is not None and getattr(cache, "is_compileable", False):
        raise ValueError(f"a {peft_type} adapter puts its virtual tokens (or prefix) in the key/value cache, which a "
                         f"fixed-size {type(cache).__name__} has no room for; use the default dynamic cache (drop "
                         "cache_implementation='static' from generate).")
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"a {peft_type} adapter needs the 2-D (batch, seq) attention mask to grow by its virtual "
                         f"tokens, got {shape}; pass the tokenizer's attention_mask and use the default dynamic cache.")


def as_kwargs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of ``module.forward`` turned into keyword arguments."""
    if not args:
        return dict(kwargs)
    kinds = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")
    names = [n for n, p in forward_parameters(module).items() if p.kind.name in kinds]
    return {**dict(zip(names, args)), **kwargs}


def active_prompt(model: nn.Module) -> tuple[str, PromptLearningConfig, PromptModule] | None:
    """The active prompt adapter (name, config, module), or None when none is active or adapters are off."""
    state = find_state(model)
    container = getattr(model, PROMPT_CONTAINER, None)
    if state is None or container is None or state.disabled:
        return None
    name = next((a for a in state.active if a in container), None)
    if name is None:
        return None
    config = state.configs[name]
    assert isinstance(config, PromptLearningConfig)
    return name, config, container[name]


def is_decoding(kwargs: dict) -> bool:
    """True on a cached step: the key/value cache already holds the prompt (or prefix)."""
    cache = get_cache(kwargs)
    return cache is not None and callable(getattr(cache, "get_seq_length", None)) and cache.get_seq_length() > 0


def pad_left(tensor: torch.Tensor | None, p: int, value: int | float) -> torch.Tensor | None:
    """``tensor`` (batch, seq) with ``p`` columns of ``value`` in front."""
    if tensor is None:
        return None
    if tensor.dim() != 2:
        raise ValueError(f"prompt-learning adapters need 2-D (batch, seq) masks and ids, got shape "
                         f"{tuple(tensor.shape)}; "
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

    embedding: nn.Embedding
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
