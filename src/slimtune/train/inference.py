"""A base model plus saved adapters, ready for `slimtune generate`, `eval` and `merge` (folder or GGUF).

An adapter trained with QLoRA learned on top of the *dequantized 4-bit* base, so using it on the
full-precision weights changes its output a little. When an adapter sits in a run folder
(``<run>/adapter`` next to ``<run>/recipe.yaml``) the run's ``quantization`` section is reused,
unless the caller decides (``load_in_4bit=True/False``).

Merging a QLoRA adapter (:func:`load_for_merge`, ``base=``; ``slimtune merge --base-precision``):

- ``"dequantized"`` (the default): the NF4 weights the adapter was trained on, dequantized, plus the
  adapter. The merged model computes what the fine-tune computed in training (up to rounding).
- ``"original"``: the original full-precision weights plus the adapter. Full precision is kept, but the
  adapter's correction was fitted to the NF4-rounded weights, so outputs move by about what NF4 rounding
  does to the base itself: on the tiny llama of ``tests/test_gguf_export.py`` the logits differ from the
  trained model's by 27.8% (relative norm; NF4 alone moves that base's logits by 28.0%), against 7e-7
  merged into the dequantized weights. On SmolLM2-135M with the ``qlora-smollm2-pycode`` adapter the original
  merge is 21.5% away in logits but scores a lower held-out loss (1.5745 against the trained 1.6931), the
  original base being better than its NF4 copy (``bench/gguf_roundtrip.py --adapter``). Use it when the
  full-precision base is what you will serve, and evaluate it.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from slimtune.adapter_files import load_adapter, read_adapter_config
from slimtune.core.dtypes import parse_dtype, resolve_device
from slimtune.core.files import MODEL_FOLDER_FILE, atomic_folder, check_replaceable
from slimtune.estimate import resolve_config
from slimtune.export import merge_for_export
from slimtune.gguf_export import write_gguf, write_gguf_lora
from slimtune.gguf_quants import QUANT_TYPES
from slimtune.lifecycle import set_adapter
from slimtune.perf.fast_path import KERNEL_MODES, enable_fast_path
from slimtune.quant import QuantConfig, quant_summary
from slimtune.train.models import DEFAULT_MODEL, default_model_folder_name, is_hub_id, load_model_and_tokenizer
from slimtune.train.run_folder import RunFolder


def parse_adapter_arg(text: str, index: int) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named "default" for the first, "adapter<i>" for later ones)."""
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name and os.sep not in name:
        return name, Path(path)
    return ("default" if index == 0 else f"adapter{index}"), Path(text)


DEFAULT_EVAL_LENGTH = 512  # `slimtune eval`'s row length when neither --max-seq-length nor a training run says


def run_data(adapters: Sequence[tuple[str, Path]]) -> dict[str, Any]:
    """The ``data`` section of the run that wrote the first adapter (its template, its row length), or ``{}``."""
    run = RunFolder.of_adapter(adapters[0][1]) if adapters else None
    section = (run.recipe_dict() or {}).get("data") if run is not None else None
    return section if isinstance(section, dict) else {}


def run_quantization(adapter_dir: Path) -> QuantConfig | None:
    """The ``quantization`` section of the run that wrote ``adapter_dir``, if it is a run's adapter."""
    run = RunFolder.of_adapter(adapter_dir)
    return None if run is None else run.quantization()


def base_model_of(adapter_dir: Path) -> str:
    """The base model an adapter names (``base_model_name_or_path``): a folder or file that exists here, a hub
    id, or the default model (also its converted copy in another machine's cache). A path that does not exist
    is an error: loading another model instead would apply the adapter to the wrong weights."""
    name = read_adapter_config(adapter_dir).base_model_name_or_path
    if not name or name == DEFAULT_MODEL or Path(name).expanduser().exists():
        return name or DEFAULT_MODEL
    if Path(name).name == default_model_folder_name():
        return DEFAULT_MODEL
    if is_hub_id(name):
        return name  # the Hugging Face cache, or a download
    raise FileNotFoundError(f"the adapter {adapter_dir} was trained on {name!r} (its adapter_config.json's "
                            f"base_model_name_or_path), which is not on this machine; pass that model with "
                            f"--model PATH.")


GENERATIVE_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def adapters_task_type(adapters: list[tuple[str, Path]]) -> str | None:
    """The model class the adapters were trained on (their configs' ``task_type``; None when none names one). Only
    language models generate; adapters of two different tasks cannot share one base."""
    tasks = {name: read_adapter_config(path).task_type for name, path in adapters}
    named = {task for task in tasks.values() if task is not None}
    if len(named) > 1:
        raise ValueError(f"the adapters were trained for different tasks ({tasks}); load adapters of one task.")
    task = named.pop() if named else None
    if task is not None and task not in GENERATIVE_TASKS:
        raise ValueError(f"adapter(s) {sorted(n for n, t in tasks.items() if t == task)} are {task} adapters: "
                         f"`slimtune generate`, `eval` and `merge` run language models ({', '.join(GENERATIVE_TASKS)}"
                         "); use a classification adapter from Python (slimtune.load_adapter).")
    return task


def model_task_type(model_name: str) -> str:
    """A base model's language-model class from its config: sequence-to-sequence for an encoder-decoder (T5,
    BART), else causal; causal when the config cannot be read here (loading then says why)."""
    try:
        config, _ = resolve_config(model_name)
    except (OSError, ValueError):
        return "CAUSAL_LM"
    return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"


def load_with_adapters(model_name: str | None, adapters: list[tuple[str, Path]], load_in_4bit: bool | None = None,
                       device: str = "auto", dtype: str = "float32", active: list[str] | None = None,
                       log=print, kernels: str = "auto", allow_pickle: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer): the base model, 4-bit if asked (or as its run was), with adapters loaded; a causal
    or a sequence-to-sequence LM, as the adapters' ``task_type`` says.

    ``active`` names the adapters to use (several are combined); default: the first one. ``kernels``:
    the fast path (``auto | triton | torch``, see :func:`slimtune.perf.fast_path.enable_fast_path`).
    ``allow_pickle``: also read pickle weights (``pytorch_model.bin``, ``adapter_model.bin``) from trusted sources.
    """
    # Clear errors for wrong folders or names before the (slow) model load.
    names = [name for name, _ in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {names}; name them with --adapter NAME=PATH.")
    chosen = active or names[:1]
    unknown = [a for a in chosen if a not in names]
    if unknown:
        raise ValueError(f"--active {unknown} is not a loaded adapter; loaded: {names}.")
    task_type = adapters_task_type(adapters)
    if kernels not in KERNEL_MODES:
        raise ValueError(f"kernels={kernels!r} is not a kernel mode; use one of {list(KERNEL_MODES)}.")
    if model_name is None:
        model_name = base_model_of(adapters[0][1]) if adapters else "default"
    task_type = task_type or model_task_type(model_name)  # adapters saved without a task_type: the base's class
    quant = None
    if load_in_4bit or (load_in_4bit is None and adapters):
        quant = run_quantization(adapters[0][1]) if adapters else None  # the training run's base
        if load_in_4bit and (quant is None or quant.bits != 4):  # asked for 4 bits: NF4, unless the run had 4-bit
            quant = QuantConfig()
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=dtype, device=resolve_device(device),
                                                task_type=task_type, quantization=quant, allow_pickle=allow_pickle)
    if quant is not None:
        log(str(quant_summary(model)))
    for name, path in adapters:
        load_adapter(model, path, adapter_name=name, activate=False, allow_pickle=allow_pickle)
    if adapters:
        set_adapter(model, chosen)
    if len(names) > 1:  # which of them computes is not otherwise visible
        log(f"adapters {names}: active {chosen}" + ("" if active else " (--active NAME,NAME uses several together)"))
    log(str(enable_fast_path(model, kernels)))
    model.eval()
    return model, tokenizer


def check_merged_output(output: str | os.PathLike, model: str | None, adapters: Sequence[Path] = (),
                        written: Collection[str] | None = None) -> None:
    """Refuse a merged model's output folder whose replacement would delete an input (the base model's folder,
    ``model`` or the one each adapter names; an adapter's) or files in it that are not a model folder's (the
    user's); once the new folder is written, what it holds (``written``, a tokenizer's own extra files) is the
    output's too."""
    bases = [model] if model else [read_adapter_config(path).base_model_name_or_path for path in adapters]
    inputs = [p for p in [*bases, *adapters] if p and os.path.isdir(p)]
    check_replaceable(output, lambda name: bool(MODEL_FOLDER_FILE.fullmatch(name)) or name in (written or ()),
                      inputs, "the merged model")


@torch.no_grad()
def export_merged(model: Any, tokenizer: Any, output: Path, dtype: str = "float32") -> Path:
    """Merge the active adapter into the weights (in ``dtype``) and save a plain transformers folder.

    A 4-bit base is dequantized first (what the adapter was trained on). The folder is written to a
    temporary name and renamed, so it is complete or absent.
    """
    check_merged_output(output, getattr(model, "name_or_path", None))
    model, _ = merge_for_export(model, dtype=parse_dtype(dtype), inplace=True)
    # the weights are plain now: a base loaded prequantized (bitsandbytes) must not make transformers treat the
    # merged folder as quantized again
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    with atomic_folder(output) as tmp:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # what this save writes (a tokenizer's extra templates …) may be replaced; anything else is the user's
        check_merged_output(output, getattr(model, "name_or_path", None), written={p.name for p in tmp.iterdir()})
    return output


MERGE_BASES = ("dequantized", "original")
MERGE_FORMATS = ("folder", "gguf", "gguf-lora")
DEFAULT_QUANT = {"gguf": "f16", "gguf-lora": "f32"}
_LORA_QUANTS = ("f32", "f16")  # llama.cpp applies a GGUF LoRA at run time, in float


def check_merge_options(fmt: str, quant: str | None, base: str | None, load_in_4bit: bool | None, dtype: str,
                        n_adapters: int) -> tuple[str | None, bool | None]:
    """``slimtune merge`` options checked together before any model loads: ``(quant, load_in_4bit)`` to use.

    ``fmt``: ``folder`` (transformers safetensors), ``gguf`` (merged model, one file) or ``gguf-lora`` (the
    adapter alone as a GGUF LoRA, nothing merged). ``base``: ``None`` (as ``load_in_4bit`` says, default: as
    the adapter's run did), ``"dequantized"`` or ``"original"`` (see the module docstring).
    """
    if fmt not in MERGE_FORMATS:
        raise ValueError(f"--format {fmt!r} is not an export format; use one of {list(MERGE_FORMATS)}.")
    if quant is not None and fmt == "folder":
        raise ValueError(f"--quant {quant} applies to GGUF files (--format gguf or gguf-lora); a transformers folder "
                         "is written in --dtype.")
    if fmt != "folder" and dtype != "float32":
        raise ValueError(f"--dtype {dtype} applies to --format folder; a GGUF export merges in float32 and rounds "
                         f"once to --quant ({list(QUANT_TYPES)}).")
    if fmt == "gguf-lora":
        if quant is not None and quant not in _LORA_QUANTS:
            raise ValueError(f"--quant {quant}: a GGUF LoRA adapter is stored as {list(_LORA_QUANTS)} (llama.cpp "
                             "adds it at run time); quantize the merged model instead: --format gguf --quant "
                             f"{quant}.")
        if base is not None or load_in_4bit is not None:
            raise ValueError("--format gguf-lora writes the adapter alone and merges nothing: drop --base-precision "
                             "and --load-in-4bit (llama.cpp applies the adapter on top of the base's own GGUF).")
        if n_adapters != 1:
            raise ValueError(f"--format gguf-lora writes one adapter per file; got {n_adapters} --adapter options.")
    if base is not None and base not in MERGE_BASES:
        raise ValueError(f"--base-precision {base!r}: use one of {list(MERGE_BASES)}.")
    if base == "original" and load_in_4bit:
        raise ValueError("--base-precision original merges into the full-precision weights; drop --load-in-4bit.")
    if base == "dequantized" and load_in_4bit is False:
        raise ValueError("--base-precision dequantized merges into the 4-bit weights; drop --no-load-in-4bit.")
    return quant or DEFAULT_QUANT.get(fmt), (False if base == "original" else load_in_4bit)


def load_for_merge(adapters: list[tuple[str, Path]], model_name: str | None = None,
                   base: Literal["dequantized", "original"] = "dequantized", device: str = "auto",
                   dtype: str = "float32", log=print) -> tuple[Any, Any]:
    """(model, tokenizer) to merge ``adapters`` into: see the module docstring for ``base``.

    ``"dequantized"`` loads the base 4-bit when the adapter's run trained on a 4-bit base (the weights it
    learned on, dequantized by the export); ``"original"`` loads the full-precision base in every case.
    An adapter trained on a full-precision base gives the same model either way.
    """
    if base not in MERGE_BASES:
        raise ValueError(f"base={base!r}: merge into the {MERGE_BASES[0]!r} 4-bit weights the adapter was trained "
                         f"on, or the {MERGE_BASES[1]!r} full-precision weights.")
    return load_with_adapters(model_name, adapters, None if base == "dequantized" else False, device, dtype, log=log)


@torch.no_grad()
def export_merged_gguf(model: Any, tokenizer: Any, output: Path, quant: str = "f16", *, pre: str | None = None,
                       name: str | None = None) -> Path:
    """Merge the active adapter and write one GGUF file for llama.cpp / Ollama (``slimtune merge --format gguf``).

    ``quant``: ``f32``, ``f16`` (default), ``q8_0`` or ``q4_0``. The merge is exact in fp32 (a 4-bit base is
    dequantized first), then :func:`slimtune.gguf_export.write_gguf` rounds once to ``quant``. Llama-architecture
    models only (Llama 2/3, SmolLM2, TinyLlama, ...); ``pre`` names llama.cpp's pre-tokenizer when it cannot be
    detected. The file appears at ``output`` only once complete.
    """
    merged, _ = merge_for_export(model, dtype=torch.float32, inplace=True)
    return write_gguf(merged, tokenizer, output, quant, pre=pre, name=name)


def export_adapter_gguf(adapter_dir: Path, output: Path, base_model: str | None = None, quant: str = "f32") -> Path:
    """A PEFT LoRA adapter as a GGUF LoRA adapter, for ``llama-cli -m base.gguf --lora adapter.gguf`` or an Ollama
    ``ADAPTER`` line. The base model's config (head counts, tied output) comes from ``base_model``, else the
    base the adapter names, else the default model; only its config is read (local, cached or slimtune's table).
    """
    name = base_model or base_model_of(adapter_dir)
    config, _ = resolve_config(name)
    return write_gguf_lora(adapter_dir, config, output, quant)
