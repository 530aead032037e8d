"""Will it fit, and how long? Predict a recipe's peak memory and training time from the model's config alone.

    from slimtune.estimate import estimate, check_fits
    est = estimate(load_recipe("qlora-smollm2-pycode"), device="h200")
    print(format_estimate(est))                  # component / bytes / why, the peak, step and run time
    check_fits(recipe)                           # before training: DoesNotFitError lists what makes it fit

Modules: :mod:`.model_shapes` (config → meta-device model → the method's adapter, counted),
:mod:`.activations` (what autograd keeps), :mod:`.memory` (the terms and peaks), :mod:`.devices`
(measured or declared devices), :mod:`.timing` (FLOPs and bytes → seconds), :mod:`.estimator`,
:mod:`.fit` (advice, check_fits), :mod:`.report` (table, JSON). ``slimtune estimate`` is the command.
"""

from slimtune.estimate.devices import PROFILES, DeviceProfile, device_profile, parse_memory
from slimtune.estimate.estimator import Advice, Estimate, predict, recipe_with
from slimtune.estimate.fit import DoesNotFitError, check_fits, estimate
from slimtune.estimate.model_shapes import KNOWN_CONFIGS, adapter_layout, model_shape, resolve_config
from slimtune.estimate.report import estimate_json, format_estimate

__all__ = ["estimate", "check_fits", "predict", "DoesNotFitError", "Estimate", "Advice", "DeviceProfile",
           "device_profile", "parse_memory", "PROFILES", "KNOWN_CONFIGS", "model_shape", "adapter_layout",
           "resolve_config", "recipe_with", "format_estimate", "estimate_json"]
