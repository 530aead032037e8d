"""Mixed batches: each row runs its own adapter, in forward passes and generation."""

import copy

import torch
from tiny_models import logits, sample_inputs, tiny_bert_cls

import slimtune


def test_mixed_batch_equals_per_adapter_runs_row_by_row(family):
    base, singles, multi = family
    rows = ["lora", "dora", None, "vera", "lora", "__base__"]
    inputs = sample_inputs("llama", batch=len(rows))
    slimtune.set_adapter(multi, "lora")
    with slimtune.mixed_batch(multi, rows):
        mixed = logits(multi, inputs)
    for i, name in enumerate(rows):
        reference = base if name in (None, "__base__") else singles[name]
        torch.testing.assert_close(mixed[i], logits(reference, inputs)[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(multi, inputs), logits(singles["lora"], inputs), atol=1e-5, rtol=0)  # restored


def test_one_token_rows_take_the_row_mask_path(family):
    """One token per row (a decode step's shape) runs the stacked factors with the row mask, not the per-row
    gather that longer inputs take: each row still gets only its own adapter."""
    base, singles, multi = family
    rows = ["vera", "lora", "dora", None, "lora"]
    inputs = sample_inputs("llama", batch=len(rows), seq=1)
    with slimtune.mixed_batch(multi, rows):
        mixed = logits(multi, inputs)
    for i, name in enumerate(rows):
        reference = base if name is None else singles[name]
        torch.testing.assert_close(mixed[i], logits(reference, inputs)[i], atol=1e-5, rtol=0)


def test_mixed_batch_generates_row_by_row(family):
    base, singles, multi = family
    rows = ["dora", "vera", None]
    ids = sample_inputs("llama", batch=3, seq=6)["input_ids"]
    settings = dict(max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
    with slimtune.mixed_batch(multi, rows):
        mixed = multi.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    for i, name in enumerate(rows):
        model = base if name is None else singles[name]
        alone = model.generate(ids[i: i + 1], attention_mask=torch.ones_like(ids[i: i + 1]), **settings)
        assert torch.equal(mixed[i], alone[0]), name


def test_mixed_batch_routes_head_copies():
    base = tiny_bert_cls()
    inputs = sample_inputs("bert", batch=3)
    config = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False)
    model = copy.deepcopy(base)
    singles = {}
    for name in ("a", "b"):
        torch.manual_seed(ord(name))
        singles[name] = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(**config))
        with torch.no_grad():
            singles[name].classifier.modules_to_save["default"].weight.add_(0.5)
        slimtune.add_adapter(model, slimtune.LoraConfig(**config), name)
        model.load_state_dict({k.replace(".default", f".{name}"): v for k, v in singles[name].state_dict().items()
                               if ".default" in k}, strict=False)
    with slimtune.mixed_batch(model, ["b", None, "a"]):
        mixed = logits(model, inputs)
        with slimtune.disable_adapters(model):  # the head copies too
            torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
        torch.testing.assert_close(logits(model, inputs), mixed, atol=0, rtol=0)
    for i, reference in enumerate([singles["b"], base, singles["a"]]):
        torch.testing.assert_close(mixed[i], logits(reference, inputs)[i], atol=1e-5, rtol=0)


def test_what_one_row_cannot_own_is_refused_and_names_must_match_the_rows(family, tmp_path):
    import pytest

    base, singles, multi = family
    inputs = sample_inputs("llama", batch=4)
    model = copy.deepcopy(multi)
    slimtune.add_adapter(model, slimtune.PromptTuningConfig(num_virtual_tokens=3), "prompt", activate=False)
    with pytest.raises(ValueError, match=r"\['prompt'\] are prompt-learning adapters, which change every row"):
        with slimtune.mixed_batch(model, ["prompt", None, "lora", None]):  # named: it ran the base model
            pass
    slimtune.set_adapter(model, ["lora", "prompt"])
    with pytest.raises(ValueError, match="prompt-learning adapters"):  # active: it prefixed every row
        with slimtune.mixed_batch(model, ["lora", None, "lora", None]):
            pass
    model = copy.deepcopy(multi)
    slimtune.add_adapter(model, slimtune.SelectiveConfig(target_parameters=["model.norm.weight"]), "sel")
    slimtune.set_adapter(model, ["lora", "sel"])
    with pytest.raises(ValueError, match=r"'sel' \(SELECTIVE\) has its trained values in the base weights"):
        with slimtune.mixed_batch(model, ["lora", None, None, None]):  # every row ran it
            pass
    slimtune.set_adapter(model, "lora")  # its values put aside: served
    with slimtune.mixed_batch(model, ["lora", None]):  # it ran rows lora, lora, base, base
        with pytest.raises(ValueError, match="got 2 adapter names but the model received a batch of 4 rows"):
            model(**inputs)
        with pytest.raises(ValueError, match="got 2 adapter names but the model received a batch of 4 rows"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)  # (PEFT refuses it too)
    with slimtune.mixed_batch(model, ["lora", None, "dora", None]):
        model.train()
        with pytest.raises(ValueError, match="mixed_batch serves inference"):
            model(**inputs)
        model.eval()
    with pytest.raises(ValueError, match="mixed_batch serves inference"):
        with slimtune.mixed_batch(model.train(), ["lora"] * 4):
            pass
    model.eval()
    with slimtune.disable_adapters(model), slimtune.mixed_batch(model, ["lora", "dora", None, "vera"]):
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=1e-6, rtol=0)  # as PEFT's
    with slimtune.mixed_batch(model, ["lora", "dora", None, "vera"]), slimtune.disable_adapters(model):
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=1e-6, rtol=0)  # either order
