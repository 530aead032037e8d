"""YAML recipes → typed configs: one file says what to fine-tune, how, on what, and where to write.

A recipe has these sections (all optional except ``method.peft_type``; see ``recipes/*.yaml``)::

    description: one line shown by `slimtune recipes`
    model:        {name_or_path, dtype, device, gradient_checkpointing, ...}   -> ModelSection
    method:       {peft_type: LORA, r: 16, ...}     -> the registered method config (config_from_dict)
    quantization: {bits: 4, quant_type: nf4, ...} or absent     -> slimtune.quant.QuantConfig
    data:         {dataset: pycode, max_seq_length: 256, ...}                 -> DataSection
    training:     {max_steps: 50, learning_rate: 2e-4, ...}                   -> TrainingSection
    output:       {dir: runs/NAME, ...}                                        -> OutputSection
    demo:         {enabled: true, max_new_tokens: 64}                          -> DemoSection

Overrides ``key.sub=value`` (from the command line) are applied to the parsed YAML before
validation; values are read as YAML scalars (``true``, ``16``, ``2e-4``, ``[q_proj, v_proj]``).
Every unknown key or wrongly typed value is a :class:`RecipeError` naming the full dotted key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml

from slimtune.config import MethodConfig
from slimtune.methods import config_classes
from slimtune.optim import OPTIMIZER_ALIASES, OPTIMIZER_NAMES
from slimtune.quant import QuantConfig
from slimtune.train.adapter_start import method_from_adapter
from slimtune.train.ludwig import is_ludwig_config, ludwig_to_recipe_dict
from slimtune.train.recipe_checks import check_combinations
from slimtune.train.schema import RecipeError, build, parse_yaml, unknown_key_error

# Shipped recipes live inside the package (so a wheel carries them); the repository's top-level
# ``recipes`` is a symlink to this folder, so `slimtune train recipes/x.yaml` works from the repo root.
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "qlora-smollm2-pycode"
DTYPES = Literal["float32", "bfloat16", "float16"]
REPORTERS = Literal["jsonl", "tensorboard", "wandb"]  # training.report_to (slimtune.train.tracking)


_ENV_VAR = re.compile(r"\$(\w+|\{\w+\})")


def expand_vars(value: str, key: str) -> str:
    """``$VAR`` / ``${VAR}`` in a recipe path replaced by the environment's value (as a shell would; ``~`` is
    expanded where the path is used). An unset variable is an error, not a folder named ``$VAR``. Paths are
    relative to the working directory, as on the command line."""
    expanded = os.path.expandvars(value)
    unset = _ENV_VAR.search(expanded)
    if unset:
        raise ValueError(f"{key}={value!r}: the environment variable {unset.group(1).strip('{}')} is not set; set it "
                         "or write the path out.")
    return expanded


@dataclass
class ModelSection:
    """Which base model to load and how (see :func:`slimtune.train.models.load_model_and_tokenizer`)."""

    name_or_path: str = "default"  # "default" = the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None  # load the tokenizer from elsewhere (default: the model's folder)
    dtype: DTYPES = "float32"  # weight dtype of the non-quantized parts
    device: str = "auto"  # "auto" = cuda when available, else cpu
    # Recompute each decoder layer in backward (less memory, ~30% slower); "offload" also keeps the
    # layer inputs in CPU memory (GPU only). See slimtune.checkpointing.
    gradient_checkpointing: bool | Literal["offload"] = False
    allow_pickle: bool = False  # accept pytorch_model.bin (runs code from the file: trusted sources only)
    # "random": no weights read: the model of name_or_path's config (a folder, or a name in slimtune's table of
    # architectures, e.g. meta-llama/Llama-3.1-8B) with random weights, built layer by layer — for timing
    # `slimtune train` on large shapes. config_overrides change the config first (e.g. num_hidden_layers: 2).
    init: Literal["pretrained", "random"] = "pretrained"
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # Train a saved adapter further (a finished run's adapter/, or PEFT's): its folder decides the method section.
    adapter: str | None = None

    def __post_init__(self) -> None:
        self.name_or_path = expand_vars(self.name_or_path, "name_or_path")
        self.tokenizer = None if self.tokenizer is None else expand_vars(self.tokenizer, "tokenizer")
        self.adapter = None if self.adapter is None else expand_vars(self.adapter, "adapter")
        if self.config_overrides and self.init != "random":
            raise ValueError("config_overrides only apply to init: random (a pretrained model's weights fix its "
                             "shapes); remove them or set model.init: random.")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith(("cuda", "mps", "xpu"))):
            raise ValueError(f"device={self.device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


@dataclass
class DataSection:
    """Training and evaluation data (see :func:`slimtune.train.data.load_examples`)."""

    dataset: str = "pycode"  # built-in "pycode", or a .jsonl/.json/.csv/.tsv/.txt file (path relative to cwd)
    eval_dataset: str | None = None  # default: the validation split of ``dataset``
    validation_fraction: float = 0.05  # share of ``dataset`` held out when eval_dataset is not given
    max_train_examples: int | None = None
    max_eval_examples: int | None = 64
    max_seq_length: int = 512
    packing: bool = False
    use_chat_template: bool | None = None  # None: the tokenizer's chat template when it has one

    def __post_init__(self) -> None:
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length={self.max_seq_length} must be at least 2.")
        for name in ("dataset", "eval_dataset"):
            value = getattr(self, name)
            if value is not None:
                value = expand_vars(value, name)
                setattr(self, name, value)
            if value is not None and not str(value).strip():
                raise ValueError(f"{name}={value!r} is empty; give a file, a folder, a hub id or "
                                 f"{'pycode' if name == 'dataset' else 'null (the held-out split of dataset)'}.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be in (0, 1).")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive integer or null (all examples).")


@dataclass
class TrainingSection:
    """The optimization: AdamW, warmup + decay schedule, accumulation, clipping, eval and checkpoints."""

    seed: int = 0
    optim: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit (slimtune.optimizers)
    loss: Literal["auto", "chunked", "full"] = "auto"  # chunked: no full-vocabulary logits (auto: when possible)
    # auto: Triton kernels + fused LoRA on CUDA, the fastest pure-torch path elsewhere (slimtune.perf.fast_path)
    kernels: Literal["auto", "triton", "torch"] = "auto"
    # keep each 4-bit layer's dequantized weight from forward to backward: one dequantization per step instead
    # of two, for the weights' memory (small with gradient checkpointing: one block's at a time)
    keep_dequantized: bool = False
    # torch.compile each transformer block (slimtune.perf.compilation): seconds to compile, a faster step
    compile: bool = False
    max_steps: int | None = None  # optimizer steps; null = ``epochs`` passes over the data
    epochs: float = 1.0
    batch_size: int = 1
    eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"  # transformers' names
    warmup_steps: int | None = None  # null = warmup_ratio of the steps
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # the schedule decays to learning_rate * min_lr_ratio
    max_grad_norm: float | None = 1.0  # null = no clipping
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on CPU
    eval_every: int = 0  # steps between evaluations (0: only before and after training)
    save_every: int = 0  # steps between checkpoints (0: at the end and on Ctrl-C only)
    keep_checkpoints: int = 2
    log_every: int = 1  # steps between metrics.jsonl rows
    # where metrics rows go besides metrics.jsonl (always written): tensorboard, wandb (offline without WANDB_API_KEY)
    report_to: list[REPORTERS] | REPORTERS = field(default_factory=lambda: ["jsonl"])
    # Optimizer groups (slimtune.optim): LoRA+ trains B at ratio × the learning rate (null: off) …
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    # … and layer-wise decay multiplies the learning rate by this per block downwards (null: off).
    layerwise_lr_decay: float | None = None

    def __post_init__(self) -> None:
        if not -(2**63) <= self.seed < 2**64:  # torch.manual_seed's range
            raise ValueError(f"seed={self.seed} is out of range; use an integer from 0 to 2**64 - 1 (e.g. 42).")
        known = list(OPTIMIZER_NAMES) + sorted(OPTIMIZER_ALIASES)
        if self.optim.lower() not in known:
            raise ValueError(f"optim={self.optim!r} is not an optimizer; use one of {known}.")
        positive = ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 (off) or a number of steps.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be at least 1, or null to train for `epochs`.")
        if self.epochs <= 0:
            raise ValueError(f"epochs={self.epochs} must be positive.")
        modes = get_args(get_type_hints(TrainingSection)["mixed_precision"])  # a section made in Python is checked too
        if self.mixed_precision not in modes:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of {list(modes)} (fp16 needs loss "
                             "scaling, which slimtune does not do: use bf16).")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive (e.g. 2e-4 for LoRA).")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be 0 (off) or positive, e.g. 0.01.")
        if self.adam_epsilon <= 0:
            raise ValueError(f"adam_epsilon={self.adam_epsilon} must be positive, e.g. 1e-8.")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas={self.adam_betas} must be two numbers in [0, 1), e.g. [0.9, 0.999].")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1).")
        if self.lr_scheduler == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise ValueError("lr_scheduler=constant has no warmup (as in transformers); use lr_scheduler: "
                             "constant_with_warmup, or drop warmup_steps / warmup_ratio.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be 0 or more.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")
        if self.min_lr_ratio and self.lr_scheduler.startswith("constant"):
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} is where a decay ends, and lr_scheduler="
                             f"{self.lr_scheduler} does not decay; use lr_scheduler: cosine or linear, or drop "
                             "min_lr_ratio.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be positive, or null for no clipping.")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio < 1:
            raise ValueError(f"loraplus_lr_ratio={self.loraplus_lr_ratio} must be ≥ 1 (lr_B / lr_A; the paper "
                             "suggests 16), or null for off.")
        if self.layerwise_lr_decay is not None and not 0 < self.layerwise_lr_decay <= 1:
            raise ValueError(f"layerwise_lr_decay={self.layerwise_lr_decay} must be in (0, 1] (0.8 is common), "
                             "or null for off.")
        self.report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"report_to={self.report_to} names a destination twice.")
        if self.loraplus_lr_ratio is not None and self.layerwise_lr_decay is not None:
            raise ValueError("loraplus_lr_ratio and layerwise_lr_decay both set: each defines the optimizer's "
                             "parameter groups; use one of them.")


@dataclass
class OutputSection:
    """Where the run folder goes: metrics.jsonl, loss.png, checkpoints/, adapter/, recipe.yaml."""

    dir: str = "runs/{name}"  # {name} is the recipe's name (its file name without .yaml)
    overwrite: bool = False  # replace an existing finished run folder instead of refusing
    plot: bool = True  # write loss.png (matplotlib)

    def __post_init__(self) -> None:
        self.dir = expand_vars(self.dir, "dir")


@dataclass
class DistributedSection:
    """Training on several processes (``torchrun``, or ``slimtune train --nproc-per-node N``); see
    :mod:`slimtune.distributed`. ``training.batch_size`` is per rank: a step takes batch_size × accumulation ×
    ranks rows."""

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: fsdp when the weights exceed fsdp_fraction of a device
    cpu_offload: bool = False  # fsdp on GPUs: keep the parameter shards in CPU memory (FSDP2's CPUOffloadPolicy)
    fsdp_fraction: float = 0.5  # auto's threshold: the base's stored bytes over one device's memory
    timeout_s: float = 600.0  # a collective waiting longer (a dead or stuck rank) ends the run with an error

    def __post_init__(self) -> None:
        if not 0.0 < self.fsdp_fraction <= 1.0:
            raise ValueError(f"fsdp_fraction={self.fsdp_fraction} must be in (0, 1].")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be a positive number of seconds.")
        if self.cpu_offload and self.strategy == "ddp":
            raise ValueError("cpu_offload=true keeps FSDP's parameter shards in CPU memory, and strategy=ddp shards "
                             "nothing; use strategy: fsdp (or auto), or drop cpu_offload.")


@dataclass
class DemoSection:
    """What `slimtune train` shows around training: a sample generation before and after."""

    enabled: bool = False
    prompt: str | None = None  # default: the first evaluation example's prompt
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1.")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "training": TrainingSection,
    "output": OutputSection,
    "demo": DemoSection,
}
TOP_LEVEL = ("description", "model", "method", "quantization", "data", "training", "output", "demo", "distributed")


@dataclass
class Recipe:
    """A validated recipe. ``name`` is the file name without ``.yaml`` (or "recipe" for a dict)."""

    method: MethodConfig
    model: ModelSection = field(default_factory=ModelSection)
    quantization: QuantConfig | None = None  # None: a full-precision base
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    output: OutputSection = field(default_factory=OutputSection)
    demo: DemoSection = field(default_factory=DemoSection)
    distributed: DistributedSection | None = None  # None: one process, unless started by torchrun
    description: str = ""
    name: str = "recipe"
    # How the command line named it: the recipe as given and its overrides, quoted for a shell ("" for a dict).
    command: str = field(default="", compare=False)

    def command_line(self, *extra: str) -> str:
        """The arguments that rebuild this recipe (plus ``extra``), for the commands slimtune suggests."""
        return " ".join([self.command or (self.name if self.name != "recipe" else "<recipe>"), *extra])

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name)).expanduser()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that :func:`recipe_from_dict` reads back into an equal recipe."""
        out: dict[str, Any] = {"description": self.description}
        for key in ("model", "method", "quantization", "data", "training", "output", "demo"):
            value = getattr(self, key)
            if key == "method":
                value = _method_dict(value)
            elif key == "quantization":
                value = None if value is None else value.to_dict()
            elif value is not None:
                value = dataclasses.asdict(value)
            out[key] = value
        if self.distributed is not None:
            out["distributed"] = dataclasses.asdict(self.distributed)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _method_dict(config: MethodConfig) -> dict[str, Any]:
    data = config.to_dict()
    return {"peft_type": data.pop("peft_type"), **data}


def _build_method(data: Any, task_default: str) -> MethodConfig:
    if not isinstance(data, dict):
        raise RecipeError("method: missing or not a mapping; give at least `method: {peft_type: LORA}`.")
    classes = config_classes()
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise RecipeError(f"method.peft_type: missing; use one of {sorted(classes)}.")
    if not isinstance(peft_type, str) or peft_type not in classes:
        raise RecipeError(f"method.peft_type: {peft_type!r:.80} is not a known method; use one of {sorted(classes)}.")
    if peft_type == "LAYERDROP":  # a recipe holds one method, and LayerDrop alone trains nothing
        raise RecipeError("method.peft_type: LAYERDROP adds no parameters to train, and a recipe holds one method; "
                          "train another method (e.g. LORA) and add LayerDrop beside it from Python "
                          "(slimtune.apply_layerdrop(model, 0.1) after add_adapter).")
    data = dict(data)
    data.setdefault("task_type", task_default)
    return build(classes[peft_type], data, "method", skip=frozenset({"peft_type"}))


def recipe_from_dict(data: Any, name: str = "recipe") -> Recipe:
    """Validate a parsed recipe dict into a :class:`Recipe` (raises :class:`RecipeError`)."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a YAML mapping with sections {list(TOP_LEVEL)}, "
                          f"got {type(data).__name__}.")
    for key in data:
        if key not in TOP_LEVEL:
            raise unknown_key_error(str(key), list(TOP_LEVEL), str(key))
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise RecipeError(f"description: expected a string, got {type(description).__name__}.")
    sections = {key: build(cls, data.get(key), key) for key, cls in SECTIONS.items()}
    quant = data.get("quantization")
    quantization = build(QuantConfig, quant, "quantization") if quant is not None else None
    adapter = sections["model"].adapter
    method = _build_method(data.get("method"), "CAUSAL_LM") if adapter is None else \
        method_from_adapter(adapter, data.get("method"))
    distributed = build(DistributedSection, data["distributed"], "distributed") if "distributed" in data else None
    check_combinations(method, quantization, distributed, sections)
    return Recipe(method=method, quantization=quantization, description=description, name=name,
                  distributed=distributed, **sections)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key="a.b"``, creating missing sections."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise RecipeError(f"override {key}: {where} is {child!r}, not a section with keys.")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a parsed recipe (values parsed as YAML)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {item!r} is not of the form key.sub=value (e.g. training.max_steps=10).")
        try:
            value = parse_yaml(text) if text.strip() else None
        except (yaml.YAMLError, RecursionError) as error:
            raise RecipeError(f"override {item!r:.200}: the value is not valid YAML ({error or 'nested too deeply'})."
                              ) from None
        set_dotted(data, key, value)
    return data


def list_recipes() -> list[Path]:
    """The shipped recipe files, sorted by name."""
    return sorted(RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe file from a path, or from the bare name of a shipped recipe (``lora-smollm2-pycode``)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    shipped = [p.stem for p in list_recipes()]
    if path.is_dir():
        raise RecipeError(f"recipe {text!r} is a folder; pass a .yaml file or one of {shipped}.")
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1 and (RECIPE_DIR / f"{text}.yaml").is_file():
        return RECIPE_DIR / f"{text}.yaml"
    raise RecipeError(f"recipe {text!r} not found: no such file, and not a shipped recipe name. "
                      f"Shipped recipes: {shipped} (see `slimtune recipes`).")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe {path}: {error}.") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {error}") from None
    except RecursionError:
        raise RecipeError(f"recipe {path} is not valid YAML: nested too deeply to read.") from None
    if data is None:
        raise RecipeError(f"recipe {path} is empty; it needs at least `method: {{peft_type: LORA}}`.")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections {list(TOP_LEVEL)}.")
    return data


def load_recipe(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file (or shipped recipe name).

    A file in Ludwig's LLM schema (``model_type: llm``, ``base_model``, ``input_features``, ...) is mapped
    onto slimtune's sections first (:mod:`slimtune.train.ludwig`); overrides apply to the file as written.
    """
    path = find_recipe(name_or_path)
    data = read_yaml(path)
    try:
        data = apply_overrides(data, list(overrides or []))
        if is_ludwig_config(data):
            data = ludwig_to_recipe_dict(data)
        recipe = recipe_from_dict(data, name=path.stem)
    except RecipeError as error:  # the dotted key alone does not say which file: name it first
        raise RecipeError(f"recipe {path}: {error}") from None
    recipe.command = shlex.join([os.fspath(name_or_path), *(overrides or [])])
    return recipe



def recipe_summary(path: Path) -> tuple[str, str]:
    """(description, run command) of a recipe file, read from its YAML and header comment."""
    text = path.read_text(encoding="utf-8")
    command = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.startswith("#") and line.lower().lstrip("# ").startswith("run:")),
                   f"slimtune train {path.stem}")
    try:
        description = str((yaml.safe_load(text) or {}).get("description", ""))
    except yaml.YAMLError:
        description = "(invalid YAML)"
    return description, command
