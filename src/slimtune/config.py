"""Method configs as plain, validated data, with HF PEFT's field names.

Every method config is a dataclass deriving from :class:`MethodConfig`; it holds settings only (what a
method *does* lives in its :class:`slimtune.methods.contract.Method`). Field names are spelled the way
PEFT spells them, so an ``adapter_config.json`` written by either library reads in the other.
:func:`slimtune.methods.config_from_dict` picks the class by ``peft_type``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, Union

# PEFT's task types, with the transformers auto class that loads a model for each.
TASK_TYPES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
BIAS_MODES = ("none", "all", "lora_only")
LORA_INITS = (True, False, "gaussian", "orthogonal")
# PEFT's initialisations that change the base weights too (a saved adapter needs that changed base)
CONVERTED_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

ConfigT = TypeVar("ConfigT", bound="MethodConfig")


def _is_default_like(value: Any) -> bool:
    """PEFT writes dozens of optional keys as null/false/empty; those carry no meaning for us."""
    return value in (None, False, "", [], {}, 0) or (isinstance(value, str) and value.startswith("megatron"))


# ---- validators the method configs share ------------------------------------------------------------
def str_list(name: str, value: Any, allow_str: bool = True) -> Any:
    """Normalise a PEFT "list of names or a regex string" field; sets become sorted lists; a string must compile."""
    if allow_str and isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{name}={value!r} is not a valid regular expression ({error}); a string is matched "
                             f"against full module names (e.g. r'.*\\.(q|v)_proj'), or pass a list of names.") from None
    if value is None or (allow_str and isinstance(value, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(set(value)) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{name}={value!r} must be a list of module names" + (" or a regex string." if allow_str else "."))


def check_positive_int(name: str, value: Any, optional: bool = False, hint: str = "") -> None:
    """Raise unless ``value`` is a positive integer (or None when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        allowed = " or None (read from the model)" if optional else ""
        raise ValueError(f"{name}={value!r} must be a positive integer{allowed}{hint}.")


FLOAT32_MAX = 3.4028234663852886e38  # a scale above it cannot multiply a float32 tensor


def check_positive_number(name: str, value: Any, hint: str = "") -> None:
    """Raise unless ``value`` is a number above 0 that a float32 holds (a NaN passes ``value <= 0`` and would
    train to NaN; 1e308 passes, then fails in the first forward)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= FLOAT32_MAX:
        raise ValueError(f"{name}={value!r} must be a positive number{hint}, at most {FLOAT32_MAX:.4g}.")


def check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1).")


def layer_list(value: Any) -> Any:
    """``layers_to_transform``: one index becomes a one-element list, as PEFT reads it; an empty list means every
    layer (PEFT's "no filter"), as None does."""
    if isinstance(value, (list, tuple)) and not value:
        return None
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


def check_layer_targets(config: Any) -> None:
    """Normalise and check, in place, the fields the layer-wrapping configs share (PEFT's names):
    ``target_modules`` and ``exclude_modules`` (a list, or a full-match regex string), the head copy a SEQ_CLS
    task trains by default, ``layers_to_transform``, and the values of ``rank_pattern``/``alpha_pattern``."""
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = "all-linear"  # as PEFT reads it
    config.target_modules = str_list("target_modules", config.target_modules)
    if hasattr(config, "exclude_modules"):
        config.exclude_modules = str_list("exclude_modules", config.exclude_modules)
    config.modules_to_save = default_head(config.task_type, config.modules_to_save)
    config.layers_to_transform = layer_selection(config.target_modules, config.layers_to_transform,
                                                 config.layers_pattern)
    for key, rank in getattr(config, "rank_pattern", {}).items():
        check_positive_int(f"rank_pattern[{key!r}]", rank)
    for key, alpha in getattr(config, "alpha_pattern", {}).items():
        check_positive_number(f"alpha_pattern[{key!r}]", alpha)


def layer_selection(target_modules: Any, layers_to_transform: Any, layers_pattern: Any) -> Any:
    """``layers_to_transform`` as a list, checked as PEFT checks it: a regex ``target_modules`` selects layers by
    itself (PEFT refuses both; "all-linear" is written out as names when saved, so it may take them), and a
    ``layers_pattern`` needs the indices it locates."""
    regex = isinstance(target_modules, str) and target_modules != "all-linear"
    if regex and layers_to_transform is not None:
        raise ValueError(f"layers_to_transform={layers_to_transform!r} cannot be used when target_modules is a regex "
                         f"string ({target_modules!r}); put the layer numbers in the regex, or list module names.")
    if regex and layers_pattern is not None:
        raise ValueError(f"layers_pattern={layers_pattern!r} cannot be used when target_modules is a regex string "
                         f"({target_modules!r}).")
    if layers_pattern and layers_to_transform is None:
        raise ValueError(f"layers_pattern={layers_pattern!r} needs layers_to_transform (which layer indices).")
    return layer_list(layers_to_transform)


# The freshly initialised task heads PEFT trains a copy of, by task type (its PeftModelFor* classes).
TASK_HEAD_MODULES = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}


def default_head(task_type: str | None, modules_to_save: list[str] | None) -> list[str] | None:
    """PEFT trains a copy of a classification or answer-span head (:data:`TASK_HEAD_MODULES`): its names are added to
    the ``modules_to_save`` given (even ``[]``), as PEFT's task models do; its files then hold the head, and PEFT
    cannot load one without it."""
    modules_to_save = str_list("modules_to_save", modules_to_save, allow_str=False)
    if task_type in TASK_HEAD_MODULES:
        given = modules_to_save or []
        return given + [name for name in TASK_HEAD_MODULES[task_type] if name not in given]
    return modules_to_save


@dataclass
class MethodConfig:
    """Fields every method shares (PEFT's ``PeftConfig``)."""

    peft_type: ClassVar[str] = ""
    # PEFT keys we read but do not act on; ignored without a warning whatever their value.
    ignored_keys: ClassVar[frozenset[str]] = frozenset(
        {"peft_version", "revision", "auto_mapping", "peft_type", "library_name"}
    )
    # PEFT keys that, when set, change the adapter's weights or its forward: refused, not ignored, since an adapter
    # read without them would compute something else.
    unsupported_keys: ClassVar[frozenset[str]] = frozenset()
    # Whether ``r`` (and ``rank_pattern``) is a dimension of some tensor in the adapter's file, so that a file can
    # be refused when its config's rank is larger than any of its tensors (before a huge rank is allocated).
    rank_is_a_dimension: ClassVar[bool] = True

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r} is not supported; use one of {list(TASK_TYPES)} or None.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``peft_type`` included (what ``adapter_config.json`` holds)."""
        data = {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["peft_type"] = self.peft_type
        return data

    def to_json(self) -> str:
        return config_json(self.to_dict())

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        """Build from a dict, tolerating keys of newer PEFT versions (warns when such a key is set)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names and k not in cls.ignored_keys}
        meaningful = sorted(k for k, v in unknown.items() if not _is_default_like(v))
        refused = [k for k in meaningful if k in cls.unsupported_keys]
        if refused:
            raise ValueError(f"{refused[0]}={unknown[refused[0]]!r:.60}: PEFT's {refused[0]} changes the adapter's "
                             f"weights or forward, and slimtune does not implement it"
                             f"{f' (nor {refused[1:]})' if refused[1:] else ''}; load this adapter with PEFT.")
        if meaningful:
            warnings.warn(
                f"{cls.__name__}: ignoring config keys slimtune does not support: {meaningful} "
                f"(values {[unknown[k] for k in meaningful]}); the adapter may behave differently than in PEFT.",
                stacklevel=2,
            )
        return cls(**known)

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        return dataclasses.replace(self, **changes)


def config_json(data: dict[str, Any]) -> str:
    """``adapter_config.json`` text: the fields sorted by name, as PEFT writes them, but the keys inside a field
    in their own order, since the first key of ``rank_pattern`` / ``alpha_pattern`` that matches a layer wins
    (sorting them could hand a layer another key's rank or alpha once the file is read back)."""
    return json.dumps(dict(sorted(data.items())), indent=2)


def _to_json(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return value


def fits_type(value: Any, hint: Any) -> bool:
    """Whether a config value (JSON's, or a config object's after its checks) fits a field's type hint (unknown hints:
    the config decides)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(fits_type(value, h) for h in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # finite: JSON's NaN and Infinity pass every range check (``nan <= 0`` is False)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set, frozenset):
        listed = isinstance(value, (list, tuple))
        return listed and all(fits_type(v, args[0]) for v in value) if args else listed
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (not args or all(fits_type(v, args[1]) for v in value.values()))
    return True


def check_field_types(config: MethodConfig) -> None:
    """Raise a TypeError naming the first field whose value does not fit its type (``use_rslora="yes"`` acts as
    True, is saved as "yes", and no loader, slimtune's included, would read the file back)."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.init and not fits_type(_to_json(value), hints[item.name]):
            raise TypeError(f"{type(config).__name__}: {item.name}={value!r:.80} must be of type "
                            f"{hints[item.name]}.")


@dataclass
class LoraConfig(MethodConfig):
    """LoRA (Hu et al., 2021, arXiv:2106.09685): ``h = W x + s · B A dropout(x)``.

    ``s = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``). ``target_modules`` is a
    list (exact module name or dotted suffix), a full-match regex string, or ``"all-linear"``.
    ``fan_in_fan_out`` is read from the layer itself (True for GPT-2's ``Conv1D``), as PEFT corrects it;
    a value that contradicts the layer gets a warning.
    """

    peft_type: ClassVar[str] = "LORA"
    # (settings of an initialisation, or of where PEFT runs: the file's weights are what they made)
    ignored_keys: ClassVar[frozenset[str]] = MethodConfig.ignored_keys | {
        "megatron_core", "loftq_config", "qalora_group_size", "eva_config", "corda_config", "lora_ga_config",
        "runtime_config"}
    unsupported_keys: ClassVar[frozenset[str]] = frozenset(
        {"lora_bias", "trainable_token_indices", "layer_replication", "alora_invocation_tokens",
         "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "megatron_config"})

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # nn.Parameters adapted directly (a mixture of experts' fused (experts, out, in) weights): names or dotted
    # suffixes of ``<module>.<parameter>``, e.g. ["experts.gate_up_proj", "experts.down_proj"] (PEFT's field)
    target_parameters: list[str] | None = None

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        """As :meth:`MethodConfig.from_dict`; PEFT's ``ensure_weight_tying`` is refused where it ties layers of
        this adapter (see :func:`check_weight_tying`), and dropped where it cannot (PEFT ignores it there too)."""
        check_weight_tying(data)
        return super().from_dict({k: v for k, v in data.items() if k != "ensure_weight_tying"})

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`MethodConfig.to_dict`; ``target_parameters`` only where set (PEFT before 0.17 refuses the key)."""
        data = super().to_dict()
        if data.get("target_parameters") is None:
            del data["target_parameters"]
        return data

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r, hint=" (the LoRA rank, e.g. 8 or 16)")
        check_positive_number("lora_alpha", self.lora_alpha, hint=" (scaling is alpha / r)")
        check_probability("lora_dropout", self.lora_dropout)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is not a bias mode; use one of {BIAS_MODES}.")
        if self.init_lora_weights not in LORA_INITS:
            converted = isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith(CONVERTED_INITS)
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use one of {LORA_INITS}." + (
                    " An adapter PEFT saved with this initialisation belongs to a base it changed: load it with PEFT, "
                    "or save it from PEFT with path_initial_model_for_weight_conversion (a plain LoRA of the "
                    "original base), which slimtune loads." if converted else "")
            )
        check_layer_targets(self)
        self.target_parameters = str_list("target_parameters", self.target_parameters, allow_str=False) or None
        if self.target_parameters:
            check_parameter_targets(self)


def check_parameter_targets(config: LoraConfig) -> None:
    """What LoRA on parameters (``target_parameters``) cannot do, refused as PEFT refuses it: the update is added to
    the weight before the module runs, so there is no input to drop out or to normalise against."""
    for field_name, value, allowed in (("lora_dropout", config.lora_dropout, 0.0), ("use_dora", config.use_dora, False),
                                       ("fan_in_fan_out", config.fan_in_fan_out, False)):
        if value != allowed:
            raise ValueError(f"{field_name}={value!r} cannot apply to target_parameters={config.target_parameters}: "
                             "LoRA on a parameter adds B A to the weight itself. Use "
                             f"{field_name}={allowed!r}, or a separate adapter for the target_modules that need it.")


# The layers PEFT's ensure_weight_tying ties to their twin when the model ties its embeddings (its
# EMBEDDING_LAYER_NAMES): the input embedding and the output layer.
TIED_LAYER_NAMES = ("embed_tokens", "lm_head")


def check_weight_tying(data: dict[str, Any]) -> None:
    """Refuse PEFT's ``ensure_weight_tying=True`` where PEFT would tie this adapter across the input embedding and
    the output layer (its rule: ``modules_to_save`` or ``target_modules`` names one of them), keeping one copy or
    one LoRA for both: the file then holds weights only that tying explains, and slimtune does not tie adapters."""
    if not data.get("ensure_weight_tying"):
        return
    for field_name in ("modules_to_save", "target_modules"):
        names = data.get(field_name)
        if isinstance(names, str):
            try:
                named = [n for n in TIED_LAYER_NAMES if re.fullmatch(names, n)]
            except re.error:
                named = []  # the field's own check says what is wrong with it
        else:
            named = [n for n in names or [] if isinstance(n, str) and n.rpartition(".")[2] in TIED_LAYER_NAMES]
        if named:
            raise ValueError(
                f"ensure_weight_tying={data['ensure_weight_tying']!r}: with it, PEFT ties this adapter's "
                f"{field_name} {named} to the model's tied twin layer (input embedding / output layer), one set of "
                "weights for both, which slimtune does not implement. Load this adapter with PEFT (and merge it "
                "there for a plain model); if the base model does not tie its embeddings, PEFT ties nothing: set "
                "ensure_weight_tying to false in adapter_config.json.")
