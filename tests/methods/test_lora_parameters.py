"""LoRA on parameters (``target_parameters``): fused expert stacks and plain weights against PEFT's ParamWrapper
(outputs, gradients, files both ways, nesting order of the keys), merging, removal, and what is refused."""

import copy
import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import slimtune
from slimtune.adapter_files import adapter_tensors
from slimtune.methods.lora_parameters import LoraParameters


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


class Experts(nn.Module):
    """A mixture of experts' fused weights, as transformers 5 stores them: ``(experts, out, in)`` (or, with
    ``is_transposed``, ``(experts, in, out)``), every token through its top-2 experts."""

    def __init__(self, experts: int = 3, hidden: int = 8, inner: int = 6, is_transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = is_transposed
        up, down = (experts, 2 * inner, hidden), (experts, hidden, inner)
        if is_transposed:
            up, down = (experts, hidden, 2 * inner), (experts, inner, hidden)
        self.gate_up_proj = nn.Parameter(torch.randn(up) / 3)
        self.down_proj = nn.Parameter(torch.randn(down) / 3)

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            up_w, down_w = self.gate_up_proj[e], self.down_proj[e]
            if self.is_transposed:
                up_w, down_w = up_w.T, down_w.T
            gate, up = F.linear(x, up_w).chunk(2, dim=-1)
            out = out + route[..., e:e + 1] * F.linear(F.silu(gate) * up, down_w)
        return out


class Router(nn.Module):
    """A module holding a plain 2-D weight that no linear layer wraps (adapted as one expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 8) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ self.weight.T, dim=-1)


class Block(nn.Module):
    def __init__(self, is_transposed: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.router = Router()
        self.experts = Experts(is_transposed=is_transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.q_proj(x)
        return x + self.experts(x, self.router(x))


class TinyMoE(nn.Module):
    def __init__(self, seed: int = 0, is_transposed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Block(is_transposed) for _ in range(2))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


X = torch.randn(4, 7, 8, generator=torch.Generator().manual_seed(1))
BOTH = ["experts.gate_up_proj", "experts.down_proj"]


def _config(cls, **kw):
    settings = {"r": 2, "lora_alpha": 5, "target_modules": ["q_proj"], "target_parameters": BOTH,
                "init_lora_weights": False, **kw}
    return cls(**settings)


def _pair(tmp_path, is_transposed=False, **kw):
    """PEFT's model with random factors, saved; slimtune's model loading that file."""
    torch.manual_seed(5)
    theirs = peft.get_peft_model(TinyMoE(is_transposed=is_transposed), _config(peft.LoraConfig, **kw))
    theirs.save_pretrained(tmp_path / "peft")
    ours = slimtune.load_adapter(TinyMoE(is_transposed=is_transposed), tmp_path / "peft", is_trainable=True)
    return theirs, ours


@pytest.mark.parametrize("is_transposed", [False, True], ids=["experts-out-in", "experts-in-out"])
def test_outputs_gradients_and_files_match_peft_both_ways(tmp_path, is_transposed):
    kw = {"target_parameters": [*BOTH, "router.weight"], "rank_pattern": {"layers.1.experts.down_proj": 3},
          "alpha_pattern": {"router.weight": 2.0}}
    theirs, ours = _pair(tmp_path, is_transposed, **kw)
    base_out = TinyMoE(is_transposed=is_transposed)(X)
    expected = theirs(X)
    assert (expected - base_out).abs().max() > 1e-2  # the adapter changes the output
    assert close(ours(X), expected)

    theirs(X).square().mean().backward()
    ours(X).square().mean().backward()
    peft_grads = {k.replace(".default", ""): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = adapter_tensors(ours)  # the live tensors under PEFT keys
    assert sorted(peft_grads) == sorted(ours_grads)
    for key, tensor in ours_grads.items():
        assert tensor.grad is not None and close(tensor.grad, peft_grads[key]), key

    slimtune.save_adapter(ours, tmp_path / "ours")
    stored, written = load_file(tmp_path / "peft/adapter_model.safetensors"), load_file(
        tmp_path / "ours/adapter_model.safetensors")
    assert sorted(stored) == sorted(written) and all(torch.equal(stored[k], written[k]) for k in stored)
    # one wrapper per parameter in PEFT, the first registered innermost: its factors sit one base_layer deeper
    assert "base_model.model.layers.0.experts.base_layer.lora_A.weight" in written
    assert written["base_model.model.layers.1.experts.lora_A.weight"].shape == (3 * 3, 6)  # down_proj, r 3 × 3
    assert json.loads((tmp_path / "ours/adapter_config.json").read_text())["target_parameters"] == kw[
        "target_parameters"]
    reloaded = peft.PeftModel.from_pretrained(TinyMoE(is_transposed=is_transposed), tmp_path / "ours")
    assert close(reloaded(X), expected)


def test_an_adapter_made_here_loads_into_peft(tmp_path):
    torch.manual_seed(2)
    ours = slimtune.add_adapter(TinyMoE(), _config(slimtune.LoraConfig, target_modules=[]))
    assert not any(isinstance(m, slimtune.methods.lora_layers.LoraLinear) for m in ours.modules())
    slimtune.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(TinyMoE(), tmp_path / "a")
    assert close(theirs(X), ours(X))
    assert (ours(X) - TinyMoE()(X)).abs().max() > 1e-2


def test_each_adapters_file_holds_its_own_nesting(tmp_path):
    """Two adapters adapting different parameters of one module: each file is laid out as PEFT lays out that adapter
    alone (its first parameter innermost), whatever the other adapter adds."""
    model = TinyMoE()
    torch.manual_seed(3)
    slimtune.add_adapter(model, _config(slimtune.LoraConfig, target_parameters=["experts.down_proj"]), "down")
    slimtune.add_adapter(model, _config(slimtune.LoraConfig, target_modules=[]), "both")
    assert isinstance(model.layers[0].experts, LoraParameters)  # one wrapper holds both adapters
    for name, expected_keys in (("down", {"experts.lora_A.weight"}),
                                ("both", {"experts.lora_A.weight", "experts.base_layer.lora_A.weight"})):
        slimtune.set_adapter(model, name)
        slimtune.save_adapter(model, tmp_path / name, adapter_name=name)
        keys = {k.removeprefix("base_model.model.layers.0.") for k in load_file(
            tmp_path / name / "adapter_model.safetensors") if k.startswith("base_model.model.layers.0.experts")}
        assert keys == expected_keys | {k.replace("lora_A", "lora_B") for k in expected_keys}
        theirs = peft.PeftModel.from_pretrained(TinyMoE(), tmp_path / name)
        assert close(theirs(X), model(X)), name


def test_merge_unmerge_and_unload(tmp_path):
    theirs, ours = _pair(tmp_path)
    base = TinyMoE()
    before = ours(X).detach()
    slimtune.merge_adapter(ours)
    assert close(ours(X), before)
    assert not torch.allclose(ours.layers[0].experts.base_layer.down_proj, base.layers[0].experts.down_proj)
    slimtune.unmerge_adapter(ours)
    assert close(ours(X), before)
    merged = slimtune.merge_and_unload(ours)
    assert type(merged.layers[0].experts) is Experts
    peft_merged = theirs.merge_and_unload()
    for key, tensor in peft_merged.state_dict().items():
        assert close(merged.state_dict()[key], tensor), key


def test_unmerge_and_unload_give_the_base_back(tmp_path):
    _, ours = _pair(tmp_path)
    base = TinyMoE()
    slimtune.merge_adapter(ours)
    slimtune.unmerge_adapter(ours)
    plain = slimtune.unload(ours)
    assert type(plain.layers[1].experts) is Experts
    for key, tensor in base.state_dict().items():
        assert close(plain.state_dict()[key], tensor), key
    assert close(plain(X), base(X))


def test_deleting_the_adapter_restores_the_module():
    model = slimtune.add_adapter(TinyMoE(), _config(slimtune.LoraConfig, target_modules=[]), "a")
    router_only = _config(slimtune.LoraConfig, target_modules=[], target_parameters=["router.weight"])
    slimtune.add_adapter(model, router_only, "b")
    slimtune.delete_adapter(model, "a")
    assert type(model.layers[0].experts) is Experts and isinstance(model.layers[0].router, LoraParameters)


def test_training_moves_only_the_factors_and_a_bf16_weight_stays_bf16():
    model = TinyMoE().to(torch.bfloat16)
    frozen = copy.deepcopy(model.state_dict())
    slimtune.add_adapter(model, _config(slimtune.LoraConfig, init_lora_weights=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):
        model(X.to(torch.bfloat16)).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    experts = model.layers[0].experts
    assert experts.base_layer.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(experts.base_layer.gate_up_proj, frozen["layers.0.experts.gate_up_proj"])
    assert experts.lora_B["default"]["gate_up_proj"].weight.abs().max() > 0  # B left its zero init


@pytest.mark.parametrize("settings, error, message", [
    ({"lora_dropout": 0.1}, ValueError, "lora_dropout=0.1 cannot apply to target_parameters"),
    ({"use_dora": True}, ValueError, "use_dora=True cannot apply"),
    ({"target_parameters": "experts.down_proj"}, TypeError, "must be a list"),
    ({"target_parameters": ["experts.nope"]}, ValueError, "matched no parameter. Weights held by modules other"),
    ({"target_parameters": ["q_proj.weight"]}, ValueError, "a layer is adapted one way"),
    ({"init_lora_weights": "orthogonal"}, ValueError, "cannot initialise LoRA on target_parameters"),
])
def test_what_lora_on_parameters_refuses(settings, error, message):
    model = TinyMoE()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        slimtune.add_adapter(model, _config(slimtune.LoraConfig, **settings))
    assert not any(isinstance(m, slimtune.methods.layers.TunerLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_combination_and_mixed_batches_refuse_parameter_adapters(tmp_path):
    model = slimtune.add_adapter(TinyMoE(), _config(slimtune.LoraConfig, target_modules=[]), "a")
    slimtune.add_adapter(model, _config(slimtune.LoraConfig, target_modules=[]), "b")
    with pytest.raises(ValueError, match="adapts parameters .*no weighted combination"):
        slimtune.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab")
    slimtune.save_adapter(model, tmp_path / "a", adapter_name="a")
    with pytest.raises(ValueError, match="adapts parameters"):
        slimtune.combine_adapter_files([tmp_path / "a", tmp_path / "a"], [0.5, 0.5], tmp_path / "c")
    model.eval()
    with pytest.raises(ValueError, match="cannot be routed per row"), slimtune.mixed_batch(model, ["a", "b", "a", "b"]):
        model(X)


def test_rank_pattern_keys_name_parameters():
    config = _config(slimtune.LoraConfig, target_modules=[], rank_pattern={"layers.1.experts.down_proj": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = slimtune.add_adapter(TinyMoE(), config)
    assert model.layers[1].experts.lora_A["default"]["down_proj"].weight.shape == (4 * 3, 6)
    assert model.layers[0].experts.lora_A["default"]["down_proj"].weight.shape == (2 * 3, 6)
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['experts.dwn_proj'\] match no adapted layer"):
        slimtune.add_adapter(TinyMoE(), _config(slimtune.LoraConfig, rank_pattern={"experts.dwn_proj": 4}))


@pytest.mark.parametrize("variant", [slimtune.LoraFAConfig, slimtune.DeltaLoraConfig])
def test_lora_variants_of_linear_layers_refuse_parameters(variant):
    with pytest.raises(ValueError, match="adapts linear layers only; use LoraConfig for parameters"):
        variant(target_parameters=BOTH)


def test_a_config_without_parameters_saves_no_such_key():
    """PEFT before 0.17 refuses the key: a LoRA adapter of linear layers only is written as before."""
    assert "target_parameters" not in slimtune.LoraConfig(target_modules=["q_proj"]).to_dict()
    assert slimtune.LoraConfig(target_parameters=BOTH).to_dict()["target_parameters"] == BOTH


@pytest.mark.parametrize("settings, message", [
    ({"modules_to_save": ["experts"]}, "is trained whole .* and adapted through target_parameters"),
    ({"modules_to_save": ["layers.1"]}, "is trained whole"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True cannot apply to target_parameters"),
])
def test_what_peft_refuses_beside_parameters_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        slimtune.add_adapter(TinyMoE(), _config(slimtune.LoraConfig, **settings))


def test_all_linear_beside_parameters_saves_only_linear_layers_as_target_modules(tmp_path):
    """"all-linear" is written out as the layers it picked: the modules adapted through their parameters are not
    among them (a file naming `experts` in target_modules loaded in neither slimtune nor PEFT)."""
    model = slimtune.add_adapter(TinyMoE(), _config(slimtune.LoraConfig, target_modules="all-linear"))
    slimtune.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["head", "q_proj"] and saved["target_parameters"] == BOTH
    theirs = peft.PeftModel.from_pretrained(TinyMoE(), tmp_path)
    assert close(theirs(X), model(X)) and close(slimtune.load_adapter(TinyMoE(), tmp_path)(X), model(X))


def test_under_autocast_the_adapted_weight_keeps_its_dtype():
    """As PEFT: the update is added in the weight's dtype, not rounded to bf16 by autocast with the whole stack."""
    model = slimtune.add_adapter(TinyMoE(), _config(slimtune.LoraConfig))
    layer = model.layers[0].experts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = layer.adapted_weight("gate_up_proj", ["default"])
    assert adapted.dtype == torch.float32
    assert torch.equal(adapted, layer.adapted_weight("gate_up_proj", ["default"]))
