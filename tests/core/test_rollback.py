"""A change that fails part-way leaves the model as it was: add_adapter with one layer refusing late, on a fresh
model and beside an adapter whose layers it shares; names the adapter containers cannot hold."""

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

import slimtune
from slimtune.methods.layers import TunerLayer

# orthogonal init needs an even rank: the last layer's rank 3 is refused after the other layers were wrapped
LATE_REFUSAL = {"target_modules": "all-linear", "init_lora_weights": "orthogonal",
                "rank_pattern": {"layers.1.mlp.down_proj": 3}}
IDS = torch.arange(2, 12).reshape(2, 5)


def _picture(model: torch.nn.Module) -> tuple:
    """Everything a failed add must not change: module tree, tensors, trainability, modes, bookkeeping, outputs."""
    state = getattr(model, "slimtune_state", None)
    layers = {n: (type(m).__name__, list(m.active_adapters), {a: sorted(m.adapter_names) for a in m.adapter_attrs})
              for n, m in model.named_modules() if isinstance(m, TunerLayer)}
    with torch.no_grad():
        out = model(IDS).logits
    return (repr(model), {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, [m.training for m in model.modules()],
            None if state is None else (list(state.configs), list(state.active)), layers, out)


def _assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2:6] == after[2:6]
    assert torch.equal(before[6], after[6])


def test_a_late_refusal_on_a_fresh_model_changes_nothing():
    model = tiny_llama().eval()
    before = _picture(model)
    with pytest.raises(ValueError, match="needs an even rank"):
        slimtune.add_adapter(model, slimtune.LoraConfig(**LATE_REFUSAL))
    _assert_same(before, _picture(model))
    assert not hasattr(model, "slimtune_state")
    # and the model takes a valid adapter as a fresh one does
    fresh = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(target_modules=["q_proj"]))
    slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["q_proj"]))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        sum(p.numel() for p in fresh.parameters() if p.requires_grad)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora-beside", "dora-upgrade"])
def test_a_late_refusal_beside_another_adapter_leaves_its_layers_alone(use_dora):
    torch.manual_seed(0)
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(target_modules=["q_proj", "down_proj"],
                                                                   init_lora_weights=False), "a")
    model.eval()
    before = _picture(model)
    held = model.model.layers[1].mlp.down_proj
    with pytest.raises(ValueError, match="needs an even rank"):  # into a's layers (or upgrading them to DoRA)
        slimtune.add_adapter(model, slimtune.LoraConfig(use_dora=use_dora, **LATE_REFUSAL), "d")
    _assert_same(before, _picture(model))
    assert model.model.layers[1].mlp.down_proj is held and list(held.scaling) == ["a"]


@pytest.mark.parametrize("name, why", [("__base__", "mixed_batch reads '__base__' as the base model"),
                                       ("train", "it is an attribute of the containers"),
                                       ("get", "it is an attribute"), ("training", "it is an attribute"),
                                       ("_modules", "it is an attribute")])
def test_names_the_adapter_containers_cannot_hold_are_refused_up_front(name, why):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"adapter name '{name}' is taken: {why}"):
        slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["q_proj"]), name)
    assert not hasattr(model, "slimtune_state")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tables_a_method_shares_across_adapters_are_restored_too(tmp_path):
    """An AdapterHub adapter whose initial weights hold a NaN is refused after every site was wrapped and hooked: the
    hooks' table in the state (a dict inside a dict) is restored with the rest, so the same adapter added again
    gets its hooks (the stale entries made it skip them: the forward failed)."""
    source = tiny_llama()
    slimtune.add_adapter(source, slimtune.BottleneckConfig(placement="adapterhub", adapter_type="houlsby"), "h")
    slimtune.save_adapter(source, tmp_path, "h")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    first = next(iter(tensors))
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", adapter_type="pfeiffer"), "p")
    with pytest.raises(ValueError):
        slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", adapter_type="houlsby",
                                                              init_from=str(tmp_path)), "h")
    slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", adapter_type="houlsby"), "h",
                         activate=True)
    assert model(IDS).logits.shape == (2, 5, 128)


def test_a_warning_turned_into_an_error_undoes_the_add_and_the_random_draws():
    """Everything add_adapter does is taken back, the steps after the layers were wrapped included (the tied-weights
    warning, under -W error), and so are the random numbers the new layers drew."""
    model = tiny_llama(tie_word_embeddings=True).eval()
    before = _picture(model)
    rng = torch.random.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="shared with"):
            slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["q_proj", "lm_head"]))
    _assert_same(before, _picture(model))
    assert not hasattr(model, "slimtune_state") and torch.equal(torch.random.get_rng_state(), rng)


@pytest.mark.parametrize("config", [slimtune.PromptTuningConfig(num_virtual_tokens=2), slimtune.IA3Config(),
                                    slimtune.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])],
                         ids=["prompt-hooks", "ia3", "lora-head-copy"])
def test_memory_running_out_at_the_end_of_an_add_changes_nothing(config, monkeypatch):
    """A failure after the method built everything (hooks on the model, wrappers, head copies): all taken back."""
    model = tiny_llama().eval()
    before = _picture(model)
    hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]

    def out_of_memory(*args):
        raise MemoryError

    monkeypatch.setattr(slimtune.lifecycle, "_take_host_mode", out_of_memory)
    with pytest.raises(MemoryError):
        slimtune.add_adapter(model, config)
    _assert_same(before, _picture(model))
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == hooks


@pytest.mark.parametrize("failure", [KeyboardInterrupt, MemoryError])
def test_a_failed_activation_beside_a_sparse_adapter_puts_its_trained_values_back(failure, monkeypatch):
    """Activating the new adapter swaps an active Selective adapter's trained values out of the weights (in place,
    which no snapshot restores): a failure there removes the new adapter and re-activates the old one, values in."""
    model = slimtune.add_adapter(tiny_llama(), slimtune.SelectiveConfig(target_modules=["q_proj"]), "s").eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5)  # "trained"
    trained = model(IDS).logits.detach()
    apply_bias_modes = slimtune.lifecycle._apply_bias_modes

    def fails_at_the_end(*args):
        apply_bias_modes(*args)
        raise failure

    monkeypatch.setattr(slimtune.lifecycle, "_apply_bias_modes", fails_at_the_end)
    with pytest.raises(failure):
        slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["v_proj"]), "x", activate=True)
    monkeypatch.undo()
    assert model.slimtune_state.active == ["s"] and list(model.slimtune_state.configs) == ["s"]
    assert torch.equal(model(IDS).logits, trained)
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad
