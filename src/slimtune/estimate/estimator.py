"""The prediction for one recipe on one device: shapes → memory terms → peaks, step time, run time.

Only the model's config is read; nothing is loaded, downloaded or allocated. :mod:`.fit` adds the advice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from slimtune.estimate.activations import Precision, activation_model
from slimtune.estimate.devices import DeviceProfile
from slimtune.estimate.memory import Component, MemoryModel, memory_model
from slimtune.estimate.model_shapes import AdapterLayout, ModelShape, adapter_layout, model_shape
from slimtune.estimate.per_rank import Distribution, distribution, per_rank
from slimtune.estimate.timing import StepTime, step_time
from slimtune.perf.fast_path import plan_fast_path
from slimtune.perf.losses import router_aux_coef
from slimtune.quant.config import stored_quantization
from slimtune.train.data import load_examples
from slimtune.train.recipe import Recipe, apply_overrides, recipe_from_dict

__all__ = ["Estimate", "Advice", "predict", "precision_of", "recipe_with", "CHARS_PER_TOKEN"]

CHARS_PER_TOKEN = 3.5  # typical for BPE tokenizers on English and code; only used to size packed epochs


@dataclass
class Advice:
    label: str  # e.g. "model.gradient_checkpointing: false → true"
    overrides: list[str]  # the recipe overrides that apply it
    peak: int
    fits: bool
    step_seconds: float | None
    kind: int  # 0: same training, 1: changes the numerics (quantization), 2: changes the data (truncation)
    needed: int  # what the run needs of the limit: the peak, or on a CPU that of a node's ranks together


@dataclass
class Estimate:
    recipe: Recipe
    shape: ModelShape
    layout: AdapterLayout
    device: DeviceProfile
    precision: Precision
    chunked: bool
    memory: MemoryModel
    time: StepTime | None
    total_steps: int | None
    steps_note: str
    eval_seconds: float | None
    advice: list[Advice] = field(default_factory=list)
    distribution: Distribution | None = None  # a distributed run: the memory is per rank

    @property
    def peak(self) -> int:
        return self.memory.peak

    @property
    def ranks(self) -> int:
        return self.distribution.ranks if self.distribution is not None else 1

    @property
    def needed(self) -> int:
        """What the run needs of the limit: the peak, or on a CPU that of every rank of a node (they share its
        memory)."""
        if self.device.on_gpu or self.distribution is None:
            return self.peak
        return self.peak * self.distribution.per_machine

    @property
    def limit(self) -> int:
        """The memory the run may use: --memory, else what is free now (measured), else the device's total."""
        return self.device.free if self.device.free is not None else self.device.memory

    @property
    def fits(self) -> bool:
        return self.needed <= self.limit

    @property
    def run_seconds(self) -> float | None:
        if self.time is None or self.total_steps is None:
            return None
        return self.total_steps * self.time.seconds + (self.eval_seconds or 0.0)


_SHAPES: dict[str, ModelShape] = {}
_LAYOUTS: dict[tuple[str, str], AdapterLayout] = {}


def _shape_and_layout(recipe: Recipe) -> tuple[ModelShape, AdapterLayout]:
    """Cached per model name and method config (advice re-estimates without rebuilding either)."""
    spec = recipe.model
    overrides = dict(spec.config_overrides) if spec.init == "random" else {}  # a random model's own shapes
    name = spec.name_or_path + (json.dumps(overrides, sort_keys=True) if overrides else "")
    if name not in _SHAPES:
        _SHAPES[name] = model_shape(spec.name_or_path, overrides)
    key = (name, json.dumps(recipe.method.to_dict(), sort_keys=True, default=str))
    if key not in _LAYOUTS:
        try:
            _LAYOUTS[key] = adapter_layout(_SHAPES[name], recipe.method)
        except (ValueError, TypeError) as error:
            raise ValueError(f"method: {recipe.method.peft_type} cannot be added to {spec.name_or_path!r}: "
                             f"{error}") from None
    return _SHAPES[name], _LAYOUTS[key]


def _chunked(recipe: Recipe, shape: ModelShape, layout: AdapterLayout) -> bool:
    """What the trainer's ``chunked_loss_works`` decides, without running the model."""
    mode = recipe.training.loss
    if mode == "full":
        return False
    possible = shape.head_name is not None and not layout.forward_hooks and not router_aux_coef(shape.meta)
    if mode == "chunked" and not possible:
        raise ValueError("training.loss: 'chunked' cannot be used with this model and method (prompt learning's "
                         "hooks, or no output layer to split the loss at); use 'auto' or 'full'.")
    return possible


def precision_of(recipe: Recipe, device: DeviceProfile) -> Precision:
    mixed = recipe.training.mixed_precision
    autocast = mixed == "bf16" or (mixed == "auto" and device.on_gpu)
    triton, fused = plan_fast_path(recipe.training.kernels, torch.device("cuda" if device.on_gpu else "cpu"), None)
    return Precision(weight=4 if recipe.model.dtype == "float32" else 2, autocast=autocast,
                     quantized=recipe.quantization is not None, fused=fused, triton=triton,
                     keep_dequantized=recipe.training.keep_dequantized)


def _overhead(device: DeviceProfile) -> list[Component]:
    if device.on_gpu:
        return [Component("overhead", "CUDA context + workspaces", device.context,
                          "CUDA context, cuBLAS workspace, kernels (not in torch's allocated figure)")]
    return [Component("overhead", "python + torch process", device.context,
                      "resident set of a fresh Python that imported slimtune's training stack (measured)")]


def _memory(recipe: Recipe, shape: ModelShape, layout: AdapterLayout, device: DeviceProfile) -> tuple[
        MemoryModel, Precision, bool]:
    prec = precision_of(recipe, device)
    chunked = _chunked(recipe, shape, layout)
    acts = activation_model(shape, layout, recipe.training.batch_size, recipe.data.max_seq_length, prec,
                            recipe.model.gradient_checkpointing, on_gpu=device.on_gpu)
    mem = memory_model(shape, layout, acts, quant=recipe.quantization, prec=prec, optim=recipe.training.optim,
                       batch=recipe.training.batch_size, seq=recipe.data.max_seq_length, chunked=chunked,
                       on_gpu=device.on_gpu, overhead=_overhead(device), heap_retention=device.heap_retention,
                       eval_batch=min(recipe.training.eval_batch_size,
                                      recipe.data.max_eval_examples or recipe.training.eval_batch_size))
    return mem, prec, chunked


def _time(recipe: Recipe, shape: ModelShape, layout: AdapterLayout, device: DeviceProfile, prec: Precision,
          chunked: bool) -> StepTime:
    t = recipe.training
    return step_time(shape, layout, device, prec, batch=t.batch_size, seq=recipe.data.max_seq_length,
                     accumulation=t.gradient_accumulation_steps,
                     checkpointing=bool(recipe.model.gradient_checkpointing),
                     quant=recipe.quantization, chunked=chunked, optim=t.optim)


def _steps(recipe: Recipe) -> tuple[int | None, str]:
    """Optimizer steps of the run as the trainer counts them (``max_steps``, else epochs over the rows)."""
    t, data = recipe.training, recipe.data
    if t.max_steps is not None:
        return t.max_steps, "training.max_steps"
    try:
        examples = load_examples(data.dataset, split="train", validation_fraction=data.validation_fraction,
                                 max_examples=data.max_train_examples, hash_split=data.eval_dataset is None)
    except (OSError, ValueError) as error:
        return None, f"steps unknown: the data did not load ({error})"
    if data.packing:
        chars = sum(len(str(e.get("prompt", ""))) + len(str(e.get("response", e.get("text", "")))) for e in examples)
        rows = max(1, math.ceil(chars / CHARS_PER_TOKEN / data.max_seq_length))
        how = f"{len(examples):,} examples packed into ~{rows:,} rows (~{CHARS_PER_TOKEN} characters per token)"
    else:
        rows, how = len(examples), f"{len(examples):,} rows"
    per_epoch = math.ceil(math.ceil(rows / t.batch_size) / t.gradient_accumulation_steps)
    return max(1, math.ceil(t.epochs * per_epoch)), f"{t.epochs:g} epoch(s) of {how}"


def recipe_with(recipe: Recipe, overrides: list[str]) -> Recipe:
    """``recipe`` with ``key.sub=value`` overrides applied (validated like the command line's)."""
    return recipe_from_dict(apply_overrides(recipe.to_dict(), list(overrides)), name=recipe.name)


def predict(recipe: Recipe, device: DeviceProfile, *, timing: bool = True, ranks: int = 1,
            per_machine: int | None = None) -> Estimate:
    """Predict ``recipe``'s memory (and, with ``timing``, its step and run time) on ``device``; no advice.
    ``ranks`` > 1 (or a recipe with a ``distributed`` section): the memory of each rank of that many processes
    (:mod:`.per_rank`; ``per_machine`` of them share a CPU node's memory); the step time stays one rank's (the
    collectives are not modelled). A model folder quantized by bitsandbytes is counted as stored (it loads so)."""
    shape, layout = _shape_and_layout(recipe)
    stored = stored_quantization(shape.meta.config)
    if stored is not None:
        compute = recipe.quantization.compute_dtype if recipe.quantization is not None else None
        recipe = dataclasses.replace(recipe, quantization=dataclasses.replace(stored, compute_dtype=compute))
    mem, prec, chunked = _memory(recipe, shape, layout, device)
    dist = None
    if ranks > 1 or recipe.distributed is not None:
        dist = distribution(recipe, ranks, mem.component("weights") + mem.component("weights_fp"), device.memory,
                            device.on_gpu, per_machine)
        mem = per_rank(mem, shape, recipe, dist)
    est_time = _time(recipe, shape, layout, device, prec, chunked) if timing else None
    steps, note = _steps(recipe) if timing else (None, "")
    if steps is not None and dist is not None and recipe.training.max_steps is None:
        steps = max(1, math.ceil(steps / dist.ranks))  # each step takes a batch from every rank
    eval_seconds = None
    if est_time is not None and recipe.data.max_eval_examples:
        eval_tokens = 2 * recipe.data.max_eval_examples * recipe.data.max_seq_length  # before and after training
        eval_seconds = eval_tokens / max(est_time.tokens_per_second, 1e-9) / 3  # a forward is ~1/3 of a step
    return Estimate(recipe, shape, layout, device, prec, chunked, mem, est_time, steps, note, eval_seconds,
                    distribution=dist)
