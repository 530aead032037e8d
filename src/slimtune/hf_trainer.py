"""transformers' ``Trainer`` with slimtune adapters: one callback does around it what slimtune's own trainer does.

    import slimtune
    from transformers import Trainer

    slimtune.add_adapter(model, slimtune.LoraConfig(r=16, target_modules="all-linear"))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[slimtune.SlimtuneCallback()])

The Trainer already trains exactly the adapter's parameters (the rest is frozen) and resumes from its own
checkpoints, which hold the whole model under slimtune's module names. The callback adds:

- after every optimizer step, :func:`slimtune.after_optimizer_step`: the methods' own work after an update
  (Delta-LoRA moves the base weight W; without the callback a Delta-LoRA adapter trains as plain LoRA);
- before training, a check that the optimizer has the learning rates a method sets per group (LoRA+; build it with
  ``slimtune.create_loraplus_optimizer``);
- in every checkpoint folder (``checkpoint-N/``), the adapter in PEFT's format (``adapter/``, or
  ``adapter-<name>/`` for each of several adapters), which ``slimtune.load_adapter`` and PEFT load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from slimtune.adapter_files import save_adapter
from slimtune.core.state import find_state
from slimtune.lifecycle import after_optimizer_step, method_param_groups

__all__ = ["SlimtuneCallback"]


class SlimtuneCallback(TrainerCallback):
    """See the module docstring. ``save_adapters``: write the adapters into each checkpoint folder."""

    def __init__(self, save_adapters: bool = True) -> None:
        self.save_adapters = save_adapters

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        """Refuse an optimizer without the learning rates the active method sets per group (LoRA+'s B matrices
        learn ``loraplus_lr_ratio`` times faster): the Trainer's default one would train it as plain LoRA."""
        if model is None or optimizer is None or find_state(model) is None:
            return
        wanted = method_param_groups(model, args.learning_rate)
        if wanted is None:
            return
        # the rate each group starts from (a warmup has set the current ones to 0), against the method's groups
        # that scale with the learning rate (LoRA+'s embedding rate is a fixed number)
        rates = {id(p): group.get("initial_lr", group["lr"]) for group in optimizer.param_groups
                 for p in group["params"]}
        ratios = {rates[id(p)] / group["lr"] for group in wanted if group.get("name") != "embedding"
                  for p in group["params"] if id(p) in rates}
        fixed = [abs(rates[id(p)] - group["lr"]) <= 1e-6 * group["lr"] for group in wanted
                 if group.get("name") == "embedding" for p in group["params"] if id(p) in rates]
        if max(ratios, default=1.0) > min(ratios, default=1.0) * (1 + 1e-6) or not all(fixed):
            raise ValueError("the active adapter sets its own learning rate per parameter group (LoRA+), which the "
                             "Trainer's optimizer does not have: it would train as plain LoRA. Pass Trainer(optimizers="
                             "(slimtune.create_loraplus_optimizer(model, torch.optim.AdamW, lr=...), None)).")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and find_state(model) is not None:
            after_optimizer_step(model)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        adapters = find_state(model) if model is not None else None
        if not self.save_adapters or adapters is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        names = list(adapters.configs)
        for name in names:
            save_adapter(model, folder / ("adapter" if len(names) == 1 else f"adapter-{name}"), name)
