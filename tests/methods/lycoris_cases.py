"""LoHa and LoKr (the LyCORIS family) side by side: the PEFT config, slimtune config, layer class and tensor prefix
of each, and a PEFT/slimtune pair holding the same random factors."""

import copy

import peft
from tiny_models import FAMILIES

import slimtune
from slimtune.methods.loha import LohaLinear
from slimtune.methods.lokr import LokrLinear

KINDS = {"loha": (peft.LoHaConfig, slimtune.LohaConfig, LohaLinear, "hada_"),
         "lokr": (peft.LoKrConfig, slimtune.LokrConfig, LokrLinear, "lokr_")}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"], "t5": ["q", "v", "wo"]}


def lycoris_kwargs(family, **extra):
    kwargs = {"r": 4, "alpha": 6, "target_modules": TARGETS[family], **extra}
    if family == "bert":
        kwargs.update(task_type="SEQ_CLS", modules_to_save=["classifier"])
    return kwargs


def lycoris_pair(kind, family, **extra):
    """A base model, PEFT's adapter of ``kind`` with random factors (none zero), and ours holding the same ones."""
    theirs_cls, ours_cls, _, prefix = KINDS[kind]
    base = FAMILIES[family][0]()
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cls(init_weights=False, **lycoris_kwargs(family, **extra)))
    ours = slimtune.add_adapter(copy.deepcopy(base), ours_cls(**lycoris_kwargs(family, **extra)))
    state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()
             if prefix in k or "modules_to_save" in k}
    result = ours.load_state_dict(state, strict=False)
    assert state and not result.unexpected_keys and not [k for k in result.missing_keys if prefix in k]
    return base, theirs.eval(), ours.eval()
