"""Adapters on disk in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: the module path prefixed with ``base_model.model.`` and without the adapter name
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). An adapter folder is written
as one unit (:func:`slimtune.core.files.atomic_folder`): a reader finds the previous adapter or the
new one, never half of each, and a reader of a folder a crash interrupted repairs it first.

An adapter folder comes from others, so loading one is a trust boundary:

- nothing is unpickled (``adapter_model.bin`` only with ``allow_pickle=True``, and then with
  ``torch.load(weights_only=True)``); the safetensors file is read by the validating reader;
- every field of ``adapter_config.json`` is type-checked before the config is built, and a size field
  (a rank, a token count) larger than the file could hold is refused before anything is allocated;
- fields that would make loading reach elsewhere are dropped (a prompt's init text and its tokenizer, a
  bottleneck's ``init_from``): the weights come from the file;
- the file may hold only the tensors the config's own adapter has, with their shapes and a floating-point
  dtype: it cannot add modules or parameters, nor write into base weights the config did not declare;
- the adapter name must be a plain name (no ``.``, ``/``, ``..``), as it becomes module keys and folders; so
  must the names a config lists (AdapterFusion's ``adapter_names``), and the folders it reads them from
  (``adapter_paths``) must lie inside the adapter's own folder (relative, no ``..``, no symbolic links) unless
  the caller passes ``allow_outside_paths=True``.

Any problem is an :class:`~slimtune.errors.InvalidFileError` naming the file and the key, and leaves the
model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from slimtune.adapter_keys import (
    EMBEDDING_NAMES,
    added_rows_only,
    embedding_copies,
    embedding_weights,
    head_biases,
    resized_vocabulary_tables,
    spellings,
    vocabulary_weights,
)
from slimtune.config import MethodConfig, config_json, fits_type
from slimtune.core.files import (
    atomic_folder,
    check_name,
    check_replaceable,
    inside,
    recover_folder,
    write_file,
    writer_in_progress,
)
from slimtune.core.state import check_adapter_name, find_state, get_state
from slimtune.core.tensor_files import SafetensorsReader, check_finite, read_pickled_tensors
from slimtune.errors import InvalidFileError, SaveError
from slimtune.lifecycle import add_adapter, bias_mode, bias_names, undone_on_error
from slimtune.methods import REGISTRY, method_for
from slimtune.methods.contract import PEFT_PREFIX, saved_modules, tuner_layers
from slimtune.methods.lora_parameters import LoraParameters
from slimtune.methods.prefix import PrefixTuningConfig
from slimtune.methods.prompt_tuning import PromptEncoderConfig
from slimtune.methods.targets import check_not_peft_model
from slimtune.peft_conversion import warn_if_peft_drops

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# Fields that only say how to initialise an adapter; a loaded adapter's weights come from its file, so these
# are reset rather than followed (a tokenizer to download, another folder to read).
INIT_ONLY = {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
             "tokenizer_kwargs": None, "init_from": None}
# Tensors of PEFT's LoRA variants that change only how training runs (VeLoRA's compressed activations, MonteCLoRA's
# sampler of A's noise): at inference such an adapter is plain LoRA, as slimtune loads it (its config field warns).
TRAINING_ONLY = re.compile(r"\.lora_(velora_embed|monteclora_sampler)(\.|$)")
# Size fields: each unit adds at least one value to the adapter, so none can exceed the values in its file.
SIZE_FIELDS = ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
               "encoder_hidden_size", "encoder_num_layers")
RANK_FIELDS = ("r", "rank_pattern")  # ranks also appear as a tensor dimension in the file
# Fields naming other adapters (they become adapter names, module keys and folders) and folders to read them from
# (AdapterFusion's): names must be plain, folders must lie inside the adapter's own folder.
NAME_FIELDS = ("adapter_names",)
PATH_FIELDS = ("adapter_paths",)


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The live tensors of one adapter, keyed as PEFT keys them on disk."""
    state = get_state(model)
    state.check_known([adapter_name])
    config = state.configs[adapter_name]
    method = method_for(config)
    out: dict[str, torch.Tensor] = {}
    for name, layer in tuner_layers(model):
        if adapter_name in layer.adapter_names:
            out.update({f"{PEFT_PREFIX}{name}.{k}": v for k, v in layer.adapter_tensors(adapter_name).items()})
    for name, module in saved_modules(model):
        if adapter_name in module.adapter_names:
            out.update({f"{method.saved_modules_prefix}{name}.{k}": v
                        for k, v in module.adapter_tensors(adapter_name).items()})
    params = dict(model.named_parameters())
    out.update({PEFT_PREFIX + name: params[name] for name in bias_names(model, {bias_mode(config)})})
    out.update(method.adapter_tensors(model, adapter_name, state))
    return out


def serialize_adapter(model: nn.Module, adapter_name: str = "default") -> bytes:
    """The adapter's safetensors file content (also used to report its size on disk): with the vocabulary's tables
    when it was resized (:func:`~slimtune.adapter_keys.resized_vocabulary_tables`)."""
    live = {**resized_vocabulary_tables(model, adapter_name), **adapter_tensors(model, adapter_name)}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in live.items()}
    return save(tensors, metadata={"format": "pt"})


def adapter_config_dict(model: nn.Module, adapter_name: str = "default") -> dict:
    """What ``adapter_config.json`` holds for one adapter (PEFT's fields; the base model's name)."""
    config = get_state(model).configs[adapter_name]
    data = method_for(config).saved_config(config)
    if data.get("target_modules") == "all-linear":
        data["target_modules"] = wrapped_module_names(model, adapter_name) or "all-linear"
    data["inference_mode"] = True
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or config.base_model_name_or_path
    data["base_model_name_or_path"] = name_or_path or None
    return data


def wrapped_module_names(model: nn.Module, adapter_name: str) -> list[str]:
    """The modules an adapter wraps, as ``target_modules`` names them for PEFT: "all-linear" is written out, as
    PEFT writes it (its own "all-linear" can mean other layers, e.g. the fused experts of a mixture-of-experts
    model under transformers 5). A last name component is used where it picks exactly the wrapped modules, the
    full name where it would also pick others."""
    # (the modules whose parameters target_parameters adapts are not target_modules: PEFT refuses to wrap them)
    wrapped = [n for n in wrapped_modules(model, adapter_name)
               if not isinstance(model.get_submodule(n), LoraParameters)]
    under = tuple(name + "." for name in wrapped)  # a wrapper's own children are not the base model's
    chosen = set(wrapped)
    other_leaves = {n.rpartition(".")[2] for n, _ in model.named_modules()
                    if n and n not in chosen and not n.startswith(under)}
    leaves = {name: name.rpartition(".")[2] for name in wrapped}
    return sorted({leaf if leaf not in other_leaves else name for name, leaf in leaves.items()})


def wrapped_modules(model: nn.Module, adapter_name: str) -> list[str]:
    """The full names of the modules an adapter wraps."""
    return [name for name, layer in tuner_layers(model) if adapter_name in layer.adapter_names]


def adapter_file_contents(model: nn.Module, adapter_name: str = "default") -> dict[str, bytes]:
    """The files of an adapter folder: name → content."""
    state = get_state(model)
    state.check_known([adapter_name])
    config = config_json(adapter_config_dict(model, adapter_name)) + "\n"
    files = {WEIGHTS_NAME: serialize_adapter(model, adapter_name), CONFIG_NAME: config.encode()}
    method_config = state.configs[adapter_name]
    for name, folder in method_for(method_config).bundled_adapters(method_config).items():
        for file, data in adapter_file_contents(model, name).items():
            files[f"{folder}/{file}"] = data  # e.g. fused/<name>/adapter_config.json
    return files


ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME, "README.md"}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write one adapter to the folder ``path`` in PEFT's format, as one unit, and return the folder.

    An existing adapter folder is replaced whole; a folder holding anything else is refused (nothing
    of the user's is ever deleted). A failed write (disk full, read-only) is a
    :class:`~slimtune.errors.SaveError` and leaves the previous adapter there intact."""
    folder = Path(path)
    contents = adapter_file_contents(model, adapter_name)
    if json.loads(contents[CONFIG_NAME])["peft_type"] == "LORA":
        warn_if_peft_drops(model, adapter_name, wrapped_modules(model, adapter_name))
    ours = ADAPTER_FILES | {name.split("/")[0] for name in contents}
    check_replaceable(folder, ours.__contains__, what="the adapter")
    try:
        with atomic_folder(folder) as tmp:
            for name, data in contents.items():
                write_file(tmp / name, data)
    except SaveError as error:
        raise SaveError(error.errno, f"cannot create adapter folder {folder}: {error.strerror}") from error
    return folder


# ---- reading (the trust boundary) ------------------------------------------------------------------------
def _field_error(config_file: Path, error: Exception) -> InvalidFileError:
    """A config's own ``ValueError("r=0 must be …")`` as an error naming the file and the key."""
    message = str(error)
    match = re.match(r"\w+\((\w+)=|(\w+)(\[[^\]]*\])?\s*=|(\w+) ", message)
    key = next((g for g in match.groups() if g and not g.startswith("[")), None) if match else None
    return InvalidFileError(config_file, message, key)


def config_from_file(config_file: Path, data: dict[str, Any]) -> MethodConfig:
    """Build the method config of ``adapter_config.json`` content ``data``, every field type-checked first."""
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in REGISTRY.config_classes():
        raise InvalidFileError(config_file, f"peft_type={peft_type!r:.80} is not a method slimtune knows; known types: "
                                            f"{sorted(REGISTRY.config_classes())}.", "peft_type")
    cls = REGISTRY.config_classes()[peft_type]
    init = str(data.get("init_lora_weights")).lower()  # (PEFT reads "MiCA" as "mica")
    if init == "mica":
        warnings.warn(f"{config_file}: init_lora_weights='mica': PEFT's MiCA computes as plain LoRA, as which it "
                      "loads, but trains only lora_A (lora_B frozen): training it further here trains lora_B too.",
                      stacklevel=3)
    if init in ("eva", "mica"):  # they only chose the start (EVA: A's from activations; MiCA: B's from the
        data = {**data, "init_lora_weights": True}  # weight's minor directions): a saved one is plain LoRA
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in data and field.init and not fits_type(data[field.name], hints[field.name]):
            raise InvalidFileError(config_file, f"{field.name}={data[field.name]!r:.80} is not of the field's type "
                                                f"({hints[field.name]}).", field.name)
    try:
        return cls.from_dict(data)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise _field_error(config_file, error) from None


def read_adapter_config(path: str | os.PathLike) -> MethodConfig:
    """The method config of the adapter folder ``path`` (checked: see the module docstring)."""
    folder = Path(path)
    recover_folder(folder)
    if not folder.is_dir():
        busy = " (another process is writing it right now; try again when it is done)" \
            if writer_in_progress(folder) else ""
        raise FileNotFoundError(f"adapter folder {folder} does not exist{busy}; pass the folder written by "
                                "save_adapter.")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:
        raise InvalidFileError(config_file, f"is not valid JSON ({err}); the adapter is corrupt, save it again."
                               ) from None
    if not isinstance(data, dict):
        raise InvalidFileError(config_file, f"must hold a JSON object, found {type(data).__name__}.")
    if "peft_type" not in data and isinstance(data.get("config"), dict) and "model_class" in data:
        raise InvalidFileError(folder, f"is an AdapterHub (`adapters` library) folder, not a PEFT adapter; load it "
                                       f"with slimtune.load_adapterhub(model, {str(folder)!r}).")
    return config_from_file(config_file, data)


def saved_method(path: str | os.PathLike) -> MethodConfig:
    """The method config an adapter loaded from ``path`` gets: the folder's, without the fields that only say how
    to initialise one (:data:`INIT_ONLY`: the weights come from the file)."""
    return without_init_fields(read_adapter_config(path))


def without_init_fields(config: MethodConfig) -> MethodConfig:
    """``config`` with the fields that only say how to initialise an adapter reset (:data:`INIT_ONLY`)."""
    resets = {f.name: INIT_ONLY[f.name] for f in dataclasses.fields(config)
              if f.name in INIT_ONLY and getattr(config, f.name) != INIT_ONLY[f.name]}
    return config.replace(**resets) if resets else config


def read_adapter_tensors(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of the adapter folder ``path``, but PEFT's training-only state (:data:`TRAINING_ONLY`)."""
    return {k: v for k, v in _stored_tensors(path, allow_pickle).items() if not TRAINING_ONLY.search(k)}


def _stored_tensors(path: str | os.PathLike, allow_pickle: bool) -> dict[str, torch.Tensor]:
    folder = Path(path)
    weights = folder / WEIGHTS_NAME
    if weights.exists() and not weights.is_file():
        raise InvalidFileError(weights, "is not a file (a folder?); the adapter's weights are one safetensors file.")
    if not weights.is_file():
        pickle_file = folder / PICKLE_NAME
        if not pickle_file.is_file():
            raise FileNotFoundError(f"{weights} is missing; the adapter folder has no weights.")
        if not allow_pickle:
            raise InvalidFileError(
                pickle_file, "refusing to load a pickle file: unpickling can run arbitrary code. Re-save the adapter "
                "as safetensors (PEFT: save_pretrained(..., safe_serialization=True)), or pass allow_pickle=True "
                "(the CLI: --allow-pickle) if you trust its source.")
        return read_pickled_tensors(pickle_file)  # even when allowed, torch's restricted unpickler runs no code
    try:
        with SafetensorsReader(weights) as reader:
            return reader.tensors()
    except InvalidFileError as err:
        raise InvalidFileError(weights, f"{str(err).removeprefix(str(weights) + ': ')} The adapter is corrupt.",
                               err.key) from None


def _check_sizes(config: MethodConfig, tensors: dict[str, torch.Tensor], config_file: Path) -> None:
    """Refuse sizes the file cannot hold before the adapter is built (a rank of 10¹² would allocate first)."""
    values = sum(t.numel() for t in tensors.values())
    widest = max((d for t in tensors.values() for d in t.shape), default=0)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        sizes = list(value.values()) if isinstance(value, dict) else [value]
        numbers = [s for s in sizes if isinstance(s, (int, float)) and not isinstance(s, bool)]
        if field.name in RANK_FIELDS:  # a rank is a dimension of some tensor in the file
            if not config.rank_is_a_dimension:
                continue
            bad = [s for s in numbers if s > widest]
        elif field.name in SIZE_FIELDS:
            bad = [s for s in numbers if s > values]
        elif field.name == "reduction_factor":  # the bottleneck is (hidden size / reduction_factor) wide
            bad = [s for s in numbers if 0 < s and 1 / s > values]
        else:
            continue
        if bad:
            raise InvalidFileError(config_file, f"{field.name}={bad[0]} does not fit the adapter's weights file "
                                                f"({values} values, largest dimension {widest}).", field.name)


def _confined(config: MethodConfig, folder: Path, config_file: Path, outside: bool = False) -> MethodConfig:
    """``config`` with the names it lists checked and the folders it names resolved inside ``folder`` (a name
    or folder that would reach elsewhere is an :class:`InvalidFileError`; ``outside``: folders anywhere)."""
    changes = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        try:
            if field.name in NAME_FIELDS:
                for name in value:
                    if "." in check_name(name, f"{field.name} entry"):
                        raise ValueError(f"{field.name} entry {name!r} contains '.', which cannot name a module.")
            elif field.name in PATH_FIELDS and value:  # relative to the adapter's folder
                changes[field.name] = {key: str(folder / rel if outside else inside(folder, rel))
                                       for key, rel in value.items()}
        except ValueError as error:
            raise InvalidFileError(config_file, f"{field.name}: {error}", field.name) from None
    return config.replace(**changes) if changes else config


def given_config(config: Any) -> MethodConfig:
    """``load_adapter``'s ``config=``: a slimtune method config, or PEFT's (a ``PeftConfig`` or its dict, as PEFT's
    ``from_pretrained(..., config=...)`` takes one), read as ``adapter_config.json`` is."""
    if isinstance(config, MethodConfig):
        return config
    data = config.to_dict() if callable(getattr(config, "to_dict", None)) else config
    if not isinstance(data, dict):
        raise TypeError(f"config must be a slimtune method config (e.g. LoraConfig), a PEFT config or a dict of its "
                        f"fields; got {type(config).__name__}.")
    # as adapter_config.json holds it (PEFT's target_modules: a set, written as a list)
    data = json.loads(json.dumps(data, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))
    return config_from_file(Path("config="), data)


def folded_encoder(config: MethodConfig) -> str | None:
    """What a saved prompt adapter is when its file holds its encoder's output instead of the encoder (P-tuning,
    prefix tuning with ``prefix_projection``), or None."""
    if isinstance(config, PromptEncoderConfig):
        return "a P_TUNING adapter"
    if isinstance(config, PrefixTuningConfig) and config.prefix_projection:
        return "a PREFIX_TUNING adapter with prefix_projection"
    return None


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    allow_pickle: bool = False,
    activate: bool | None = None,
    allow_outside_paths: bool = False,
    config: MethodConfig | dict[str, Any] | Any | None = None,
) -> nn.Module:
    """Add the adapter saved in ``path`` (by slimtune or HF PEFT) to ``model`` in place.

    As in PEFT, the adapter becomes active only if it is the model's first; later ones wait (the active
    adapters stay as they were) until ``set_adapter``, or ``activate=True`` makes it the only active one now
    (``activate=False``: never).

    The adapter is frozen unless ``is_trainable``, and loading it makes nothing else trainable that was not
    (adapters loaded frozen before stay frozen). A frozen load is for inference: as PEFT does, it puts the
    model in ``eval()`` mode (no dropout); call ``model.train()`` to train.

    Folders the config names (AdapterFusion's ``adapter_paths``) must lie inside ``path`` unless
    ``allow_outside_paths`` (for a folder you trust: a config could otherwise make slimtune read anywhere).

    ``config`` (slimtune's, PEFT's, or a dict of its fields) replaces the folder's ``adapter_config.json`` (as
    PEFT's ``from_pretrained(..., config=...)``); the file's tensors must still be exactly the ones it describes
    (use it to train with another dropout).

    On any mismatch (missing keys, unexpected keys, wrong shapes or dtypes, sizes the file cannot hold) the
    model is left as it was.
    """
    check_adapter_name(adapter_name)  # before any file is read
    check_not_peft_model(model)  # (inside add_adapter it would read as the file's fault)
    state = find_state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another adapter_name or delete it first.")
    config_file = Path(path) / CONFIG_NAME
    chosen = saved_method(path) if config is None else without_init_fields(given_config(config))
    # as PEFT's from_pretrained: a frozen load is for inference (a P-tuning encoder, or a prefix projection, is then
    # the table of its outputs the file holds), whatever the config says
    config = _confined(chosen.replace(inference_mode=not is_trainable), Path(path), config_file, allow_outside_paths)
    if is_trainable and folded_encoder(config):
        raise ValueError(f"{path} holds {folded_encoder(config)}: its file holds what its encoder computed, not the "
                         "encoder, so it cannot be trained further (PEFT refuses it too); load it with "
                         "is_trainable=False, or train a new adapter.")
    tensors = read_adapter_tensors(path, allow_pickle)
    _check_sizes(config, tensors, config_file)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with undone_on_error(model, adapter_name):
        try:
            add_adapter(model, config, adapter_name, activate=activate)
        except (ValueError, TypeError, KeyError, re.error) as error:
            raise _field_error(config_file, error) from None
        live = adapter_tensors(model, adapter_name)
        originals, duplicates = head_biases(model, adapter_name)
        _copy_checked(live, tensors, Path(path), {**embedding_weights(model, adapter_name), **originals},
                      [*duplicates, *embedding_copies(model, adapter_name)], vocabulary_weights(model))
    own = {id(t) for t in live.values()}
    for param in frozen:  # activating an adapter must not unfreeze one that was loaded frozen
        if id(param) not in own:
            param.requires_grad_(False)
    if not is_trainable:
        for tensor in live.values():
            tensor.requires_grad_(False)
        model.eval()
    return model


def _copy_checked(live: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], folder: Path,
                  optional: dict[str, torch.Tensor],
                  duplicates: Sequence[tuple[re.Pattern[str], torch.Tensor]] = (),
                  vocabulary: dict[str, torch.Tensor] | None = None) -> None:
    """Copy ``stored`` into ``live`` (this adapter's own tensors), ``optional`` (base weights the config
    declares, which the file may hold) and ``vocabulary`` (embedding tables, whose added rows only the file may
    bring), after checking every key, shape and dtype; nothing else is accepted. Keys matching ``duplicates``
    (another copy of a live tensor that PEFT writes but never loads) are checked against that tensor and skipped."""
    vocabulary = {k: t for k, t in (vocabulary or {}).items() if k not in live and k not in optional}
    optional = {**vocabulary, **optional}
    weights = folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder / PICKLE_NAME  # the one read
    resolved = {}
    for key, value in stored.items():
        target_key = next((k for k in spellings(key) if k in live or k in optional), PEFT_PREFIX + key)
        target = live.get(target_key, optional.get(target_key))
        skip = target is None
        if target is None:
            target = next((t for pattern, t in duplicates if pattern.fullmatch(key) or pattern.fullmatch(target_key)),
                          None)
        if target is None:
            experts = re.search(r"\.experts\.\d+\.", key) is not None  # transformers 4's one module per expert
            raise InvalidFileError(weights, f"tensor {key!r} does not belong to any module or parameter of this "
                                            "adapter's config; " + (
                                                "it adapts one expert's own layer, as transformers 4 laid mixtures of "
                                                "experts out, and transformers 5 fuses the experts into one tensor "
                                                "(adapted through target_parameters): load it with PEFT, which "
                                                "converts such files (save it from there for slimtune), or train "
                                                "the adapter again." if experts else
                                                "was the adapter trained on another architecture, or the file "
                                                "altered?"), key)
        if target.shape != value.shape:
            resized = any(n in key for n in EMBEDDING_NAMES) and target.dim() == 2 \
                and target.shape[1:] == value.shape[1:]
            raise InvalidFileError(weights, f"{key!r} has shape {tuple(value.shape)} but the model expects "
                                            f"{tuple(target.shape)}; " + (
                                                f"the adapter was trained with a vocabulary of {value.shape[0]} "
                                                "tokens: resize the base first (model.resize_token_embeddings("
                                                f"{value.shape[0]}), as for training)." if resized else
                                                "the adapter was trained for a different model size."), key)
        if target.is_floating_point() and not value.is_floating_point():
            raise InvalidFileError(weights, f"{key!r} has dtype {value.dtype}; adapter weights are floating point.",
                                   key)
        if skip:
            continue
        if target_key in vocabulary:
            added_rows_only(key, value, target, weights)
        if target_key in resolved:
            raise InvalidFileError(weights, f"{key!r} is stored twice (with and without the {PEFT_PREFIX!r} prefix).",
                                   key)
        resolved[target_key] = (target, value)
    missing = sorted(set(live) - set(resolved))
    if missing:
        raise InvalidFileError(weights, f"{len(missing)} adapter tensors are missing from the file, e.g. "
                                        f"{missing[:3]}.", missing[0])
    check_finite({key: value for key, (_, value) in resolved.items()}, weights)
    with torch.no_grad():
        for target, value in resolved.values():
            target.copy_(value.to(device=target.device, dtype=target.dtype))
