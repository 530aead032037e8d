"""AdapterHub parity cases, shared by the live oracle tests (``adapters`` installed: make test-oldest) and the
fixture capture (tests/fixtures/adapterhub/capture.py), whose files the main suite checks.

``adapters`` is imported inside the functions that need it: the main venv does not have it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert_cls, tiny_gpt2, tiny_llama

FAMILIES = {"bert": tiny_bert_cls, "gpt2": tiny_gpt2, "llama": tiny_llama}

# Case → AdapterHub config: a preset name plus overrides, or a full BnConfig (preset None). Every placement
# field of AdapterHub's BnConfig is exercised by one case or another.
CONFIGS: dict[str, tuple[str | None, dict]] = {
    "seq_bn": ("seq_bn", {"reduction_factor": 4}),
    "double_seq_bn": ("double_seq_bn", {"reduction_factor": 4}),
    "par_bn": ("par_bn", {"reduction_factor": 4}),
    "options": (None, {"mh_adapter": True, "output_adapter": True, "reduction_factor": {"0": 2, "default": 8},
                       "non_linearity": "gelu_new", "ln_after": True, "adapter_residual_before_ln": True,
                       "scaling": "channel", "use_gating": True, "original_ln_before": True,
                       "original_ln_after": False, "residual_before_ln": False, "leave_out": [1]}),
    "learned": (None, {"mh_adapter": False, "output_adapter": True, "reduction_factor": 4, "non_linearity": "tanh",
                       "ln_after": True, "scaling": "learned", "original_ln_before": False,
                       "residual_before_ln": True}),
    "ln_before": ("double_seq_bn", {"reduction_factor": 4, "ln_before": True, "scaling": 0.5,
                                    "non_linearity": "leakyrelu", "dropout": 0.1}),
    "post_add": ("seq_bn", {"reduction_factor": 4, "residual_before_ln": "post_add"}),  # BERT only (post-norm)
}
# adapters itself cannot save ln_before adapters as safetensors (the norm is registered twice): pickle only.
PICKLE_ONLY = {"ln_before"}


def cases(family: str) -> list[str]:
    return [c for c in CONFIGS if c != "post_add" or family == "bert"]


# Compositions of adapters "a" (seq_bn) and "b" (seq_bn, rf 8, gelu) with their fusion "a,b": nested tuples.
COMPOSITIONS = {
    "stack": ("Stack", "a", "b"),
    "parallel": ("Parallel", "a", "b"),
    "fuse": ("Fuse", "a", "b"),
    "stack_fuse": ("Stack", "b", ("Fuse", "a", "b")),
}


def block(module, spec):
    """``spec`` built with ``module``'s Stack / Parallel / Fuse (adapters.composition or slimtune.adapterhub)."""
    if isinstance(spec, str):
        return spec
    return getattr(module, spec[0])(*(block(module, s) for s in spec[1:]))


def perturb(model, pattern: str, seed: int) -> None:
    """Random values (not an identity) for every parameter whose name contains ``pattern``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                centre = 1.0 if "norm" in name or name.endswith("scaling") else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + centre)


def hub_config(name: str):
    import adapters

    preset, fields = CONFIGS[name]
    if preset is None:
        return adapters.BnConfig(**fields)
    return adapters.AdapterConfig.load(preset, **fields)


def hub_model(family: str, base=None):
    """An ``adapters``-initialised copy of the family's tiny model (``base``: these weights)."""
    import adapters

    model = copy.deepcopy(base) if base is not None else FAMILIES[family]()
    adapters.init(model)
    return model.eval()


def add_composition_adapters(model) -> None:
    """Adapters "a", "b" and their AdapterFusion "a,b" (dynamic), all perturbed, on an ``adapters`` model."""
    import adapters
    from adapters.composition import Fuse

    model.add_adapter("a", config=adapters.SeqBnConfig(reduction_factor=4))
    model.add_adapter("b", config=adapters.SeqBnConfig(reduction_factor=8, non_linearity="gelu"))
    model.add_adapter_fusion(Fuse("a", "b"), config="dynamic")
    perturb(model, ".adapters.a.", 11)
    perturb(model, ".adapters.b.", 12)
    perturb(model, "adapter_fusion_layer", 13)
    model.eval()


def save_hub_adapter(model, folder: Path, name: str, safetensors: bool = True) -> Path:
    model.save_adapter(str(folder), name, use_safetensors=safetensors)
    return folder


# ---- captured fixtures --------------------------------------------------------------------------------------
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "adapterhub"


def captured_base(family: str):
    """The family's tiny model with the captured base weights (transformers' initialisers differ by version)."""
    model = FAMILIES[family]()
    weights = load_file(FIXTURES / "models" / f"{family}.safetensors")
    result = model.load_state_dict(weights, strict=False)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(params & set(result.missing_keys))
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    return model.eval()


def captured(family: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / f"expected-{family}.safetensors")
