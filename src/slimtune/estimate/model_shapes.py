"""A model's shapes without its weights: the config (local, cached or from a shipped table), the module
tree built on the meta device (no memory), and what the recipe's method adds to it.

The config comes from, in order: a local folder's ``config.json``; for ``"default"`` the converted
SmolLM2-135M-Instruct folder in slimtune's cache; for a hub id the Hugging Face cache (nothing is
downloaded); else :data:`KNOWN_CONFIGS`, a table of common architectures (values from their
``config.json`` on the Hub).

The adapter is sized by running slimtune's own ``add_adapter`` on the meta-device model, so every method
counts exactly what it will create (its target matching is :func:`slimtune.methods.targets.find_targets`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from slimtune.config import MethodConfig
from slimtune.core.files import cache_root
from slimtune.core.modules import is_dense_linear, linear_dims, output_embedding_name, transformer_blocks
from slimtune.lifecycle import add_adapter
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lokr import LokrLinear
from slimtune.methods.lora_layers import LoraLinear
from slimtune.methods.lora_parameters import LoraParameters
from slimtune.quant.config import QuantConfig
from slimtune.quant.model import skipped_linear_names
from slimtune.train.models import DEFAULT_MODEL, DEFAULT_MODEL_PACKAGE, default_gguf_path, is_hub_id

__all__ = ["KNOWN_CONFIGS", "ModelShape", "AdapterLayout", "WrappedLinear", "resolve_config", "model_shape",
           "adapter_layout", "known_model_names"]

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
_LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=False)
_LLAMA32_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                   max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                   rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True)
_LLAMA32_3B = {**_LLAMA32_1B, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
               "head_dim": 128}
_QWEN25_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
_QWEN25_05B = {**_QWEN25_7B, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
               "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
               "tie_word_embeddings": True}
_MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096,
                   tie_word_embeddings=False)

# Hub id -> config fields (model_type picks the class). Matching ignores case.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "meta-llama/Meta-Llama-3-8B": {**_LLAMA31_8B, "rope_scaling": None, "max_position_embeddings": 8192},
    "meta-llama/Meta-Llama-3-8B-Instruct": {**_LLAMA31_8B, "rope_scaling": None, "max_position_embeddings": 8192},
    "meta-llama/Llama-3.2-1B": _LLAMA32_1B,
    "meta-llama/Llama-3.2-1B-Instruct": _LLAMA32_1B,
    "meta-llama/Llama-3.2-3B": _LLAMA32_3B,
    "meta-llama/Llama-3.2-3B-Instruct": _LLAMA32_3B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B,
    "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.2": {**_MISTRAL_7B, "rope_theta": 1000000.0, "sliding_window": None},
    "mistralai/Mistral-7B-v0.3": {**_MISTRAL_7B, "vocab_size": 32768, "rope_theta": 1000000.0,
                                  "sliding_window": None},
    "mistralai/Mistral-7B-Instruct-v0.3": {**_MISTRAL_7B, "vocab_size": 32768, "rope_theta": 1000000.0,
                                           "sliding_window": None},
}
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what "default" is, when its converted folder is absent


def known_model_names() -> list[str]:
    return sorted(KNOWN_CONFIGS, key=str.lower)


def _from_table(name: str) -> PretrainedConfig | None:
    key = next((k for k in KNOWN_CONFIGS if k.lower() == name.lower()), None)
    if key is None:
        return None
    fields = dict(KNOWN_CONFIGS[key])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _default_folder() -> Path | None:
    """The converted default model's folder in slimtune's cache, if it exists (nothing is converted here)."""
    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is None:
        return None
    try:
        folder = cache_root() / "models" / default_gguf_path().stem
    except FileNotFoundError:
        return None
    return folder if (folder / "config.json").is_file() else None


def resolve_config(name_or_path: str | os.PathLike) -> tuple[PretrainedConfig, str]:
    """``(config, where it came from)`` for a model name as recipes spell it; reads no weights, downloads nothing."""
    name = os.fspath(name_or_path)
    if name == DEFAULT_MODEL:
        folder = _default_folder()
        if folder is not None:
            return AutoConfig.from_pretrained(folder), f"{folder}/config.json (the converted default model)"
        config = _from_table(DEFAULT_HUB_ID)
        assert config is not None  # the table has it
        return config, f"slimtune's table ({DEFAULT_HUB_ID}, the default model)"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {name!r} has no config.json; the estimate needs the model's config "
                             "(its weights are not read).")
        return AutoConfig.from_pretrained(path), f"{path}/config.json"
    if path.suffix == ".gguf":
        converted = cache_root() / "models" / path.stem
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted), f"{converted}/config.json (converted from {path.name})"
        if path.is_file():
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), f"{path} (GGUF metadata)"
        raise FileNotFoundError(f"GGUF file {name!r} does not exist.")
    if not path.exists() and not is_hub_id(name):
        raise FileNotFoundError(f"model path {name!r} does not exist (and is not a hub id such as "
                                f"'HuggingFaceTB/SmolLM2-135M-Instruct'); pass 'default', a model folder or a hub id.")
    cached = try_to_load_from_cache(name, "config.json") if "/" in name and not path.exists() else None
    if isinstance(cached, str):
        return AutoConfig.from_pretrained(Path(cached).parent), f"{cached} (Hugging Face cache)"
    config = _from_table(name)
    if config is not None:
        return config, f"slimtune's table of common architectures ({name})"
    raise ValueError(f"model {name!r}: no local folder with config.json, not in the Hugging Face cache, and not "
                     f"in slimtune's table of architectures. Known: {', '.join(known_model_names())}. Pass a folder "
                     f"holding the model's config.json (only the config is read), or download it with "
                     f"`huggingface-cli download {name} config.json --local-dir DIR` and pass DIR.")


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM built from ``config`` on the meta device: shapes only, no memory."""
    try:
        with torch.device("meta"):
            model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r} has no causal-LM class in transformers: "
                         "`slimtune train` and `slimtune estimate` handle causal (decoder-only) language models; "
                         "pick one (Llama, Qwen, SmolLM2 …).") from None
    return model


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass
class ModelShape:
    """What the estimate needs to know about the base model (all counts exact, from the meta model)."""

    config: PretrainedConfig
    source: str
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # output head shares the input embedding's weight
    head_name: str | None
    linears: list[LinearShape]  # every nn.Linear / Conv1D, output head included
    params: int  # distinct parameters (a tied head counted once)
    buffer_bytes: int  # non-persistent buffers (rotary frequencies, ...)
    block_prefix: str  # e.g. "model.layers"
    gated_mlp: bool
    meta: nn.Module = field(repr=False)

    @functools.cached_property
    def fused_expert_params(self) -> int:
        """Parameters in 3-D expert tensors (a mixture of experts as transformers 5 builds it). They are not linear
        layers, so they stay in full precision under 4-bit, and a checkpoint stores them expert by expert, so a
        4-bit load reads the model whole first (``CheckpointNeedsMerging`` in :mod:`slimtune.train.models`)."""
        return sum(p.numel() for n, p in self.meta.named_parameters() if p.dim() == 3 and "experts" in n)

    def quantized_linears(self, quant: QuantConfig | None) -> list[LinearShape]:
        """The linear layers ``slimtune.quant.quantize`` replaces (its own rule: not skip_modules, the output
        heads or the model's ``_keep_in_fp32_modules``)."""
        if quant is None:
            return []
        skipped = set(skipped_linear_names(self.meta, quant))
        return [s for s in self.linears if s.name not in skipped]


def _first(config: PretrainedConfig, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def apply_config_overrides(config: Any, overrides: Mapping[str, Any]) -> None:
    """Set a random model's ``model.config_overrides`` on its config, each checked by the config itself."""
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model.config_overrides.{key}: {type(config).__name__} has no such field.")
        current = getattr(config, key)
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(current))
        reason = None
        if kinds is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            reason = f"expected {type(current).__name__} like its {current!r}, got {type(value).__name__}"
        else:
            try:
                setattr(config, key, float(value) if isinstance(current, float) else value)  # YAML's 1 for 1.0
            except Exception as error:  # transformers 5's configs check each field (huggingface_hub's strict types)
                reason = str(error).strip().splitlines()[-1].strip()
        if reason is not None:
            raise ValueError(f"model.config_overrides.{key}: {value!r} is not valid for {type(config).__name__} "
                             f"({reason}).")


def model_shape(name_or_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> ModelShape:
    """Read the config of ``name_or_path`` (with ``overrides``: a random model's ``model.config_overrides``)
    and build its meta-device module tree."""
    config, source = resolve_config(name_or_path)
    apply_config_overrides(config, overrides or {})
    model = meta_model(config)
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    kv_heads = int(_first(config, "num_key_value_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    intermediate = int(_first(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers"))
    head = output_embedding_name(model)
    linears = [LinearShape(n, *linear_dims(m), _bias(m)) for n, m in model.named_modules() if is_dense_linear(m)]
    blocks = transformer_blocks(model)
    prefix = blocks[0][0].rsplit(".", 1)[0] if blocks else ""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    output = model.get_output_embeddings()
    inputs = model.get_input_embeddings()
    tied = output is not None and inputs is not None and output.weight is inputs.weight
    return ModelShape(config=config, source=source, model_type=str(config.model_type), layers=layers, hidden=hidden,
                      intermediate=intermediate, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      vocab=int(config.vocab_size), tied=tied, head_name=head, linears=linears,
                      params=sum(p.numel() for p in model.parameters()),
                      buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
                      block_prefix=prefix, gated_mlp="gate_proj" in names or "gate_up_proj" in names, meta=model)


def _bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


@dataclass(frozen=True)
class WrappedLinear:
    """A linear layer the method wrapped: its dims, LoRA rank (0 for non-LoRA layers) and dropout."""

    name: str
    in_features: int
    out_features: int
    rank: int
    dropout: float
    kind: str  # the wrapper class: LoraLinear, DoraLinear, LoraFALinear, VeraLinear, IA3Linear, ...
    trains_input_factor: bool  # LoRA's A trains (so the layer keeps its input for A's gradient)
    fusable: bool  # the fast path may run it as one fused autograd node (slimtune.perf.fused_lora)
    mask_dropout: bool  # LoraLinear's own forward: dropout + A keep the input and a one-byte mask
    kept_per_token: int = 0  # LoKr: elements its structured forward keeps per token besides the input
    kept_per_call: tuple[int, int] = (0, 0)  # LoKr: W1 and W2 when built from two factors (W2: kept for dL/dx)


@dataclass
class AdapterLayout:
    """What ``add_adapter`` creates, counted on the meta model."""

    peft_type: str
    trainable: list[tuple[str, int]]  # (parameter name, elements), fp32
    trainable_bytes: int
    frozen_bytes: int  # new frozen tensors (VeRA's shared A/B, LoRA-FA's A, ...)
    wrapped: list[WrappedLinear]
    embedding_trainable: bool  # the decoder's input already requires grad (prompt tuning, LoRA on embeddings)
    forward_hooks: bool  # model-level forward hooks (prompt learning): the chunked loss cannot be used
    adapted_layers: set[int]  # indices of decoder blocks holding trainable parameters
    virtual_tokens: int = 0  # prompt tuning / P-tuning: tokens prepended to every row
    total_params: int = 0  # the model's parameters with the adapter (the denominator of the trainable share)
    # target_parameters: per decoder block, the elements of the weights LoRA adds to before the block runs (each
    # adapted copy is kept for backward by the module that uses it)
    adapted_weights: list[int] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        return sum(n for _, n in self.trainable)


def _tensor_bytes(module: nn.Module) -> dict[int, int]:
    tensors = list(module.parameters()) + list(module.buffers())
    return {id(t): t.numel() * t.element_size() for t in tensors}


def adapter_layout(shape: ModelShape, method: MethodConfig) -> AdapterLayout:
    """Add ``method`` to a fresh meta copy of the model and record what it created."""
    model = meta_model(shape.config)
    before = _tensor_bytes(model)
    add_adapter(model, method)
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
    after = _tensor_bytes(model)
    frozen = sum(size for key, size in after.items() if key not in before and key not in trainable_ids)
    wrapped = []
    wrapped = [_wrapped(name, module) for name, module in model.named_modules()
               if isinstance(module, TunerLayer) and is_dense_linear(module.base_layer)]
    prefix = shape.block_prefix + "."
    adapted = {int(index) for n, _ in trainable if n.startswith(prefix)
               and (index := n[len(prefix):].split(".", 1)[0]).isdigit()}
    per_block: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraParameters):
            block = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else name
            per_block[block] = per_block.get(block, 0) + sum(getattr(module.base_layer, p).numel()
                                                             for p in module.adapted_parameters())
    embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    hooks = bool(model._forward_pre_hooks or model._forward_hooks)  # prompt learning: trainable virtual tokens
    embedding_trainable = hooks or any(n.startswith(embed + ".") for n, _ in trainable)
    return AdapterLayout(peft_type=method.peft_type, trainable=trainable,
                         trainable_bytes=sum(p.numel() * p.element_size() for p in model.parameters()
                                             if p.requires_grad),
                         frozen_bytes=frozen, wrapped=wrapped, embedding_trainable=embedding_trainable,
                         forward_hooks=hooks, adapted_layers=adapted,
                         virtual_tokens=int(getattr(method, "num_virtual_tokens", 0) or 0)
                         if method.peft_type in ("PROMPT_TUNING", "P_TUNING") else 0,
                         total_params=sum(p.numel() for p in model.parameters()),
                         adapted_weights=list(per_block.values()))


def _wrapped(name: str, module: TunerLayer) -> WrappedLinear:
    in_f, out_f = linear_dims(module.base_layer)
    rank, dropout, trains_a = 0, 0.0, False
    if isinstance(module, LoraLinear) and module.active_adapters:
        adapter = module.active_adapters[0]
        a, _ = module.lora_modules(adapter)
        rank = int(a.out_features)
        drop = module.lora_dropout[adapter]
        dropout = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        trains_a = bool(a.weight.requires_grad)
    per_token, per_call = 0, (0, 0)
    if isinstance(module, LokrLinear) and module.active_adapters:
        per_token, *built = module.kept_elements(module.active_adapters[0])
        per_call = (built[0], built[1])
    return WrappedLinear(name, in_f, out_f, rank, dropout, type(module).__name__, trains_a, bool(module.fusable),
                         isinstance(module, LoraLinear) and type(module).forward is LoraLinear.forward,
                         per_token, per_call)
