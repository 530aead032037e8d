"""What a PEFT adapter file may hold beyond the adapter's own tensors, and the names it may give them: base
embedding weights (a resized vocabulary, embedding layers the adapter targets), head-copy duplicates and
originals PEFT writes, and the key spellings PEFT reads (with or without ``base_model.model.``, a dumped state
dict's adapter name, DoRA's magnitude with ``.weight``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from slimtune.core.state import get_state
from slimtune.errors import InvalidFileError
from slimtune.lifecycle import bias_mode
from slimtune.methods import method_for
from slimtune.methods.contract import PEFT_PREFIX, saved_modules, tuner_layers
from slimtune.methods.layers import ModulesToSave, TunerLayer

EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # PEFT saves these base weights when an adapter targets them


def embedding_weights(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Base weights PEFT may store with an adapter (``save_embedding_layers``: a resized vocabulary): those
    of the embedding and output layers the adapter's config targets, keyed as PEFT keys them."""
    return {f"{PEFT_PREFIX}{name}.base_layer.{k}": p for name, layer in tuner_layers(model)
            if adapter_name in layer.adapter_names and (isinstance(layer.base_layer, nn.Embedding)
                                                        or name.rsplit(".", 1)[-1] in EMBEDDING_NAMES)
            for k, p in layer.base_layer.named_parameters()}


def vocabulary_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``embed_tokens`` / ``lm_head`` weights (or a head copy's original) PEFT ≥ 0.7 stores whole with any
    adapter trained on a resized vocabulary ("auto" ``save_embedding_layers``), keyed as PEFT keys them. They load
    into the base, as in PEFT, only as rows of added tokens: see :func:`added_rows_only`."""
    stored: dict[str, torch.Tensor] = {}
    tables = set()  # (GPT-2's wte, T5's shared: PEFT saves the model's own embedding tables, whatever their name)
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        if callable(find := getattr(model, getter, None)):
            tables.add(id(find()))
    for name, module in model.named_modules():
        if (name.rsplit(".", 1)[-1] not in EMBEDDING_NAMES and id(module) not in tables) or isinstance(module,
                                                                                                      TunerLayer):
            continue
        held = (module.original_module, "original_module.") if isinstance(module, ModulesToSave) else (module, "")
        stored.update({f"{PEFT_PREFIX}{name}.{held[1]}{k}": p for k, p in held[0].named_parameters() if p.dim() == 2})
    return stored


def base_vocabulary_size(model: nn.Module) -> int | None:
    """The vocabulary size in the base model's own ``config.json`` (the local folder the model was loaded from), as
    PEFT reads it to tell a resized vocabulary; None where there is no such file (a hub name offline, a GGUF file)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    path = Path(source) / "config.json" if source else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    text = data.get("text_config") if "vocab_size" not in data else data
    size = text.get("vocab_size") if isinstance(text, dict) else None
    return size if isinstance(size, int) else None


def resized_vocabulary_tables(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The embedding and output tables an adapter file holds, as PEFT's "auto" ``save_embedding_layers`` writes
    them, when the vocabulary was resized since the base was saved (added tokens: their rows are trained or
    initialized here, and the base on disk lacks them); nothing otherwise."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()
    now, base = getattr(text, "vocab_size", None), base_vocabulary_size(model)
    if now is None or base is None or now == base:
        return {}
    return {**vocabulary_weights(model), **embedding_weights(model, adapter_name)}


def added_rows_only(key: str, value: torch.Tensor, base: torch.Tensor, weights: Path) -> None:
    """An adapter file may bring the rows of tokens added to the vocabulary, never change the base's own: the
    stored table must equal the base's up to its first differing row, and that row lie in the vocabulary's last
    half (the file of another base, or one written to alter it, differs from the first rows)."""
    # within the rounding of the coarser dtype (an adapter trained on a bf16 base, loaded into an fp32 one)
    coarse = max((torch.finfo(t.dtype) for t in (value, base) if t.is_floating_point()), key=lambda f: f.eps,
                 default=None)
    eps, floor = (coarse.eps, coarse.eps * coarse.tiny) if coarse is not None else (0.0, 0.0)  # (fp16 subnormals)
    stored, own = value.float(), base.detach().float().cpu()
    differs = ((stored - own).abs() > eps * own.abs() + floor).any(dim=1).nonzero()
    if len(differs) and int(differs[0]) < base.shape[0] // 2:
        raise InvalidFileError(weights, f"{key!r} would change row {int(differs[0])} of the base's "
                                        f"{base.shape[0]}-token table: an adapter may bring only the rows of tokens "
                                        "added at its end (a resized vocabulary); was it trained on another base "
                                        "model, or the file altered?", key)


def embedding_copies(model: nn.Module, adapter_name: str) -> list[tuple[re.Pattern[str], torch.Tensor]]:
    """A head copy of ``embed_tokens`` / ``lm_head`` once more under ``<head>.modules_to_save.`` (PEFT's "auto"
    ``save_embedding_layers`` keeps every key naming those layers): checked against the copy and skipped (its
    own key holds it)."""
    return [(re.compile(re.escape(f"{PEFT_PREFIX}{name}.modules_to_save.") + rf"(?:{re.escape(adapter_name)}\.)?"
                        + re.escape(k)), p)
            for name, module in saved_modules(model) if name.rsplit(".", 1)[-1] in EMBEDDING_NAMES
            and adapter_name in module.adapter_names
            for k, p in module.modules_to_save[adapter_name].named_parameters()]


def head_biases(model: nn.Module, adapter_name: str) -> tuple[dict[str, torch.Tensor],
                                                               list[tuple[re.Pattern[str], torch.Tensor]]]:
    """What PEFT's ``bias="all"`` adds to a file for each head copy (``modules_to_save``), which matches every
    parameter name holding "bias": the frozen original's biases (``<head>.original_module.bias``), which PEFT
    loads back into the original (what runs with the adapters disabled), so slimtune does too; and the copy's
    biases once more, as ``<head>.modules_to_save.[<adapter>.]bias``, which PEFT never loads (the copy's own key
    ``<head>.bias`` holds its bias), so slimtune accepts and skips them. Keyed as PEFT keys them."""
    config = get_state(model).configs[adapter_name]
    originals: dict[str, torch.Tensor] = {}
    duplicates: list[tuple[re.Pattern[str], torch.Tensor]] = []
    if bias_mode(config) != "all":
        return originals, duplicates
    for name, module in saved_modules(model):
        if adapter_name not in module.adapter_names:
            continue
        prefix = f"{method_for(config).saved_modules_prefix}{name}."
        originals.update({f"{prefix}original_module.{k}": p
                          for k, p in module.original_module.named_parameters() if k.endswith("bias")})
        # PEFT strips the adapter's name only where it is the second-to-last part (a bias of the head itself)
        duplicates += [(re.compile(re.escape(f"{prefix}modules_to_save.") + r"(?:[^.]+\.)?" + re.escape(k)), p)
                       for k, p in module.adapter_tensors(adapter_name).items() if k.endswith("bias")]
    return originals, duplicates


def spellings(key: str) -> list[str]:
    """The names a stored tensor may go by, as PEFT reads them: with or without the ``base_model.model.`` prefix,
    PEFT's in-memory adapter name (``lora_A.default.weight``, from a dumped state dict) and DoRA's magnitude as
    ``lora_magnitude_vector.weight``."""
    plain = re.sub(r"\.default(?=\.[^.]+$|$)", "", key)
    plain = plain.removesuffix(".weight") if plain.endswith("lora_magnitude_vector.weight") else plain
    return list(dict.fromkeys(k for name in (key, plain) for k in (name, PEFT_PREFIX + name)))
