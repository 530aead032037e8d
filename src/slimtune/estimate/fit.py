"""Will it fit: :func:`estimate` (with advice when it does not) and :func:`check_fits` (before training).

    est = estimate(load_recipe("qlora-smollm2-pycode"), device="h200")
    est.peak, est.fits, est.time.seconds, est.advice
    check_fits(recipe)          # raises DoesNotFitError, whose message lists the changes that make it fit

Advice: each candidate change is applied to the recipe and the whole estimate re-run, so its new peak
is the model's own answer, not a rule of thumb. Changes that keep the training identical come first
(checkpointing, chunked loss, 8-bit or paged optimizer states, smaller micro-batches with more
accumulation), then those that change the numerics (a 4/8-bit base, bf16 weights), then the data
(shorter rows); within each, the least time per token first. When no single change is enough, the
biggest savers are combined.
"""

from __future__ import annotations

from collections.abc import Iterator

from slimtune.estimate.devices import DeviceProfile, device_profile, parse_memory
from slimtune.estimate.estimator import Advice, Estimate, predict, recipe_with
from slimtune.estimate.memory import human
from slimtune.optim import OPTIMIZER_ALIASES
from slimtune.train.recipe import Recipe

__all__ = ["DoesNotFitError", "estimate", "check_fits", "advice_for", "DEFAULT_MARGIN"]

DEFAULT_MARGIN = 0.10  # check_fits refuses only when the prediction exceeds free memory by this share
MIN_SEQ = 128


class DoesNotFitError(ValueError):
    """The predicted peak exceeds the device's free memory; the message lists changes that make it fit."""

    def __init__(self, message: str, estimate: Estimate) -> None:
        super().__init__(message)
        self.estimate = estimate


def _profile(recipe: Recipe, device: str | DeviceProfile | None, memory: str | int | None,
             measure_baseline: bool) -> DeviceProfile:
    if isinstance(device, DeviceProfile):
        if memory is None:
            return device
        return device.with_memory(parse_memory(memory) if isinstance(memory, str) else int(memory))
    return device_profile(device or recipe.model.device, memory, measure_baseline=measure_baseline)


def estimate(recipe: Recipe, device: str | DeviceProfile | None = None, memory: str | int | None = None, *,
             timing: bool = True, advise: bool = True, ranks: int = 1, per_machine: int | None = None) -> Estimate:
    """Predict ``recipe``'s peak memory and time on ``device`` (a name — cpu, cuda, h200, ... — a profile, or
    by default the recipe's ``model.device``); ``memory`` ("24GB" or bytes) overrides the device's memory.
    When the peak exceeds the memory, ``advice`` lists changes that fit. ``ranks``: the memory of each rank of
    a distributed run of that many processes (the recipe's ``distributed`` section, or ddp/fsdp by ``auto``)."""
    est = predict(recipe, _profile(recipe, device, memory, measure_baseline=True), timing=timing, ranks=ranks,
                  per_machine=per_machine)
    if advise and not est.fits:
        est.advice = advice_for(est)
    return est


def check_fits(recipe: Recipe, device: str | DeviceProfile | None = None, margin: float = DEFAULT_MARGIN,
               ranks: int = 1, per_machine: int | None = None) -> Estimate:
    """Call before training: the estimate, or :class:`DoesNotFitError` when the predicted peak exceeds the
    device's free memory by more than ``margin`` (the prediction's own uncertainty). On a CPU the process's
    current resident set stands for the Python + torch baseline (this process is the one that will train)."""
    est = predict(recipe, _profile(recipe, device, None, measure_baseline=False), timing=False, ranks=ranks,
                  per_machine=per_machine)
    if est.needed <= est.limit * (1 + margin):
        return est
    est.advice = advice_for(est)
    raise DoesNotFitError(does_not_fit_message(est), est)


def does_not_fit_message(est: Estimate) -> str:
    dist = est.distribution
    per_rank = f" ({dist.per_machine} ranks × {human(est.peak)})" if dist is not None and est.needed != est.peak else ""
    lines = [f"recipe {est.recipe.name!r} needs about {human(est.needed)}{per_rank} on {est.device.name}, which has "
             f"{human(est.limit)} {'free' if est.device.free is not None else 'of memory'} "
             f"(run `slimtune estimate {est.recipe.command_line()}` for the breakdown)."]
    fitting = [a for a in est.advice if a.fits]
    if fitting:
        lines.append("Changes that make it fit (recipe overrides, new peak):")
        lines += [f"  {a.label} → {human(a.peak)}   ({' '.join(a.overrides)})" for a in fitting[:6]]
    else:
        lines.append("No change slimtune knows makes it fit; use a smaller model or a device with more memory.")
    return "\n".join(lines)


def _candidates(recipe: Recipe, on_gpu: bool) -> Iterator[tuple[str, list[str], int]]:
    """(label, overrides, kind) of each single change worth trying on ``recipe``."""
    model, t, quant = recipe.model, recipe.training, recipe.quantization
    if not model.gradient_checkpointing:
        yield "model.gradient_checkpointing: false → true", ["model.gradient_checkpointing=true"], 0
    if on_gpu and model.gradient_checkpointing != "offload":
        yield f"model.gradient_checkpointing: {str(model.gradient_checkpointing).lower()} → offload", \
            ["model.gradient_checkpointing=offload"], 0
    if t.loss == "full":
        yield "training.loss: full → chunked", ["training.loss=chunked"], 0
    optim = OPTIMIZER_ALIASES.get(t.optim.lower(), t.optim.lower())
    for target in (["adamw_8bit", "paged_adamw_8bit"] if on_gpu else ["adamw_8bit"]):
        if optim != target and not (target == "adamw_8bit" and optim == "paged_adamw_8bit"):
            yield f"training.optim: {t.optim} → {target}", [f"training.optim={target}"], 0
    if t.batch_size > 1:
        half = t.batch_size // 2
        accumulation = t.gradient_accumulation_steps * t.batch_size // half
        yield (f"training.batch_size: {t.batch_size} → {half} (gradient_accumulation_steps "
               f"{t.gradient_accumulation_steps} → {accumulation}, same effective batch)",
               [f"training.batch_size={half}", f"training.gradient_accumulation_steps={accumulation}"], 0)
    if t.eval_batch_size > t.batch_size:  # the evaluation pass may set the peak
        yield (f"training.eval_batch_size: {t.eval_batch_size} → {t.batch_size} (evaluation only)",
               [f"training.eval_batch_size={t.batch_size}"], 0)
    if quant is None:
        yield "quantization: none → 4-bit NF4 + double quant (QLoRA)", ["quantization.bits=4"], 1
        yield "quantization: none → 8-bit", ["quantization.bits=8"], 1
    elif quant.bits == 8:
        yield "quantization.bits: 8 → 4 (NF4 + double quant)", ["quantization.bits=4"], 1
    if on_gpu and model.dtype == "float32":  # not on CPUs: most lack fast bf16 matmuls
        yield "model.dtype: float32 → bfloat16", ["model.dtype=bfloat16"], 1


def _try(est: Estimate, label: str, overrides: list[str], kind: int) -> Advice | None:
    """The advice of applying ``overrides``, or None when it does not lower the peak (or is not allowed)."""
    try:
        other = predict(recipe_with(est.recipe, overrides), est.device, ranks=est.ranks,
                        per_machine=est.distribution.per_machine if est.distribution else None)
    except ValueError:
        return None  # a change this model or method does not allow
    if other.peak >= est.peak:
        return None
    seconds = other.time.seconds if other.time is not None else None
    return Advice(label, overrides, other.peak, other.fits, seconds, kind, other.needed)


def _shorter_rows(est: Estimate) -> Advice | None:
    """The longest ``data.max_seq_length`` (halving) that fits, or the shortest tried."""
    seq = est.recipe.data.max_seq_length
    found = None
    while seq // 2 >= MIN_SEQ:
        seq //= 2
        found = _try(est, f"data.max_seq_length: {est.recipe.data.max_seq_length} → {seq} (truncates longer rows)",
                     [f"data.max_seq_length={seq}"], 2)
        if found is None or found.fits:
            break
    return found


def _seconds_per_token(est: Estimate, advice: Advice) -> float:
    t = est.recipe.training
    seq = est.recipe.data.max_seq_length
    for override in advice.overrides:
        if override.startswith("data.max_seq_length="):
            seq = int(override.split("=", 1)[1])
    return (advice.step_seconds or 0.0) / max(t.batch_size * t.gradient_accumulation_steps * seq, 1)


def _keys(advice: Advice) -> set[str]:
    return {o.split("=", 1)[0] for o in advice.overrides}


def advice_for(est: Estimate, combine: int = 4) -> list[Advice]:
    """Changes that lower the peak, each with its new peak; fitting ones first (see the module docstring)."""
    singles = [a for label, overrides, kind in _candidates(est.recipe, est.device.on_gpu)
               if (a := _try(est, label, overrides, kind)) is not None]
    rows = _shorter_rows(est)
    if rows is not None:
        singles.append(rows)
    singles.sort(key=lambda a: (not a.fits, a.kind, _seconds_per_token(est, a)))
    if any(a.fits for a in singles) or not singles:
        return singles
    # nothing alone is enough: add changes, biggest saving first (shorter rows last), until it fits
    chosen: list[Advice] = []
    for advice in sorted(singles, key=lambda a: (a.kind == 2, a.peak))[:combine]:
        if any(_keys(advice) & _keys(c) for c in chosen):
            continue  # e.g. checkpointing true and offload
        chosen.append(advice)
        if len(chosen) < 2:
            continue
        combined = _try(est, "together: " + "; ".join(c.label for c in chosen),
                        [o for c in chosen for o in c.overrides], max(c.kind for c in chosen))
        if combined is not None:
            singles.insert(0, combined)
            if combined.fits:
                break
    return singles
