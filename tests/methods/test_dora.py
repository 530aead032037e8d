"""DoRA: parity with PEFT (outputs, files both ways, bitsandbytes bases), merge round trips, detached norm, one base
matmul, 4-bit bases."""

import copy

import peft
import pytest
import torch
from oracles import BITSANDBYTES_KINDS, bitsandbytes_kind_id, bitsandbytes_layers
from safetensors.torch import load_file
from tiny_models import FAMILIES, assert_base_unchanged, logits, sample_inputs, tiny_llama, train_losses

import slimtune
from slimtune.methods.dora import DoraLinear

TOL = 1e-5


def _peft_pair(family: str):
    builder, targets, kwargs = FAMILIES[family]
    base = builder()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False, **kwargs))
    ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                      use_dora=True, **kwargs))
    with torch.no_grad():  # magnitudes away from their init, so the adapter clearly changes the output
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)
    # Copy PEFT's random A, B and magnitudes (PEFT keeps m as ``lora_magnitude_vector.<name>.weight``).
    state = {k.removeprefix("base_model.model.").replace("lora_magnitude_vector.default.weight",
                                                         "lora_magnitude_vector.default"): v
             for k, v in theirs.state_dict().items()}
    shared = {k: state[k] for k in ours.state_dict() if k in state and ("lora_" in k or "modules_to_save" in k)}
    assert any("lora_magnitude_vector" in k for k in shared)
    ours.load_state_dict(shared, strict=False)
    return base, theirs, ours


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_forward_matches_peft(family):
    base, theirs, ours = _peft_pair(family)
    inputs = sample_inputs(family)
    expected = logits(theirs, inputs)
    assert (expected - logits(base, inputs)).abs().max() > 0.05 * expected.abs().max()  # not a no-op
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_files_move_both_ways(family, tmp_path):
    base, theirs, ours = _peft_pair(family)
    inputs = sample_inputs(family)
    slimtune.save_adapter(ours, tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded, inputs), logits(ours, inputs), atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(back, inputs), logits(theirs, inputs), atol=TOL, rtol=0)


def test_new_adapter_is_a_no_op_and_magnitude_is_the_row_norm():
    base = tiny_llama()
    inputs = sample_inputs("llama")
    model = slimtune.add_adapter(copy.deepcopy(base),
                                 slimtune.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DoraLinear)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], layer.base_layer.weight.norm(dim=1))
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_merge_unmerge_round_trip(family):
    builder, targets, kwargs = FAMILIES[family]
    model = builder()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=targets, use_dora=True,
                                                    init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.3)
    inputs = sample_inputs(family)
    unmerged = logits(model, inputs)
    slimtune.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)
    slimtune.unmerge_adapter(model)
    for name, p in model.named_parameters():
        plain = name.replace(".base_layer", "")
        if plain in weights:
            torch.testing.assert_close(p, weights[plain], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("active", [["lora", "dora"], ["dora", "lora"], ["dora", "lora", "dora2"]],
                         ids=["lora-first", "dora-first", "two-doras"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_several_active_adapters_merge_as_they_run_in_any_order(family, active):
    """The forward takes each DoRA norm on the unmerged W, whatever else is active: a merge of several adapters
    does too (not on W with the adapters listed before it folded in), and unmerging restores W."""
    builder, targets, _ = FAMILIES[family]
    model = builder()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, r, dora in (("dora", 2, True), ("lora", 4, False), ("dora2", 3, True)):
        slimtune.add_adapter(model, slimtune.LoraConfig(r=r, lora_alpha=5, target_modules=targets, use_dora=dora,
                                                        init_lora_weights=False), name)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.3)
    slimtune.set_adapter(model, active)
    inputs = sample_inputs(family)
    unmerged = logits(model, inputs)

    def assert_base_restored():
        for name, p in model.named_parameters():
            plain = name.replace(".base_layer", "")
            if plain in weights:
                torch.testing.assert_close(p, weights[plain], atol=1e-6, rtol=0)

    slimtune.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)
    slimtune.unmerge_adapter(model)
    assert_base_restored()
    slimtune.merge_adapter(model, active[0])  # merged one call at a time; disabling and back rebuilds the same W
    slimtune.merge_adapter(model, active[1:])
    merged = logits(model, inputs)
    with slimtune.disable_adapters(model):
        pass
    torch.testing.assert_close(logits(model, inputs), merged, atol=1e-6, rtol=0)
    slimtune.unmerge_adapter(model)
    assert_base_restored()


def _layer_with_adapter(dropout=0.0):
    torch.manual_seed(0)
    layer = DoraLinear(torch.nn.Linear(16, 12))
    layer.add_adapter("default", slimtune.LoraConfig(r=3, lora_alpha=6, use_dora=True, lora_dropout=dropout,
                                                     init_lora_weights=False), "proj")
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.5)
    return layer


def _reference(layer, x, detach_norm=True, dropped=None):
    """The paper's equation, written out with a dense W + s B A."""
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    norm = (W + s * B @ A).norm(dim=1)
    norm = norm.detach() if detach_norm else norm
    g = layer.lora_magnitude_vector["default"] / norm
    x_lora = x if dropped is None else dropped
    return g * (x @ W.T + s * x_lora @ A.T @ B.T) + b


def test_gradients_treat_the_norm_as_a_constant():
    layer = _layer_with_adapter()
    x = torch.randn(5, 16)
    grads = {}
    for key, fn in (("ours", lambda: layer(x)), ("detached", lambda: _reference(layer, x)),
                    ("through_norm", lambda: _reference(layer, x, detach_norm=False))):
        layer.zero_grad()
        (fn() ** 2).sum().backward()
        grads[key] = [p.grad.clone() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                                layer.lora_magnitude_vector["default"])]
    for ours, ref, _ in zip(grads["ours"], grads["detached"], grads["through_norm"]):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (grads["ours"][0] - grads["through_norm"][0]).abs().max() > 1e-4  # the detach matters


def test_dropout_runs_one_base_matmul_and_follows_the_equation():
    layer = _layer_with_adapter(dropout=0.5).train()
    x = torch.randn(2, 7, 16)
    calls = []
    layer.base_layer.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    torch.manual_seed(1)
    out = layer(x)
    assert calls == [(2 * 7 + 3, 16)]  # ONE base call: the 14 token rows plus A's 3 rows for the norm's W Aᵀ
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, _reference(layer, x, dropped=dropped), atol=1e-5, rtol=0)


def test_works_on_a_4bit_base():
    from slimtune.quant import QuantConfig, dequantize_model, quantize

    inputs = sample_inputs("llama")
    quantized = quantize(tiny_llama(), QuantConfig())
    dense = dequantize_model(copy.deepcopy(quantized))
    config = slimtune.LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    slimtune.add_adapter(quantized, config)
    slimtune.add_adapter(dense, config)
    dense.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    torch.testing.assert_close(logits(quantized, inputs), logits(dense, inputs), atol=1e-4, rtol=0)
    quantized.train()
    quantized(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert any("lora_magnitude_vector" in n for n in grads)


def _peft_pair_on_bitsandbytes(kind, targets=("q_proj", "down_proj")):
    """PEFT's DoRA and ours on the same bitsandbytes model (built twice: Int8Params do not deep-copy), each adapter
    as it starts; then ``share()`` gives both PEFT's adapter with random A, B and magnitudes."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": list(targets), "use_dora": True}
    theirs = peft.get_peft_model(bitsandbytes_layers(tiny_llama(), targets, *kind), peft.LoraConfig(**config))
    ours = slimtune.add_adapter(bitsandbytes_layers(tiny_llama(), targets, *kind), slimtune.LoraConfig(**config))
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_params = {n.removeprefix("base_model.model.").removesuffix(".weight") if "magnitude" in n else
                   n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(peft_params) == set(mine) and any("magnitude" in n for n in mine)

    def share():
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in peft_params.items():
                p.copy_(p * (1 + 0.2 * torch.rand(p.shape, generator=g)) if "magnitude" in name else
                        0.1 * torch.randn(p.shape, generator=g))
                mine[name].copy_(p)
    return theirs, ours, peft_params, mine, share


def _assert_same_gradients(ours: dict, theirs: dict) -> None:
    """Each gradient within 1e-5 of the largest entry of PEFT's (float32 rounding is ~3e-7 of it here)."""
    for name, p in ours.items():
        scale = theirs[name].grad.abs().max().item()
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5 * scale, rtol=0, msg=name)


def _logits_and_backward(model, ids):
    """The logits of ONE forward, whose loss is backpropagated (PEFT's 8-bit layers on CPU fail a second one)."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach()


@pytest.mark.parametrize("kind", BITSANDBYTES_KINDS, ids=bitsandbytes_kind_id)
def test_on_bitsandbytes_layers_magnitudes_outputs_and_gradients_match_peft(kind):
    """On bitsandbytes' layers (nn.Linear subclasses) the magnitude started from the raw codes' row norms (8-bit:
    351.8 for PEFT's 0.0932), and 4-bit failed on the packed weight's shape."""
    theirs, ours, peft_params, mine, share = _peft_pair_on_bitsandbytes(kind)
    for name in [n for n in mine if "magnitude" in n]:
        torch.testing.assert_close(mine[name], peft_params[name], atol=1e-6, rtol=1e-6)
    share()
    ids = sample_inputs("llama")["input_ids"]
    theirs.train(), ours.train()
    torch.testing.assert_close(_logits_and_backward(ours, ids), _logits_and_backward(theirs, ids), atol=1e-5, rtol=1e-5)
    _assert_same_gradients(mine, peft_params)


def test_a_bitsandbytes_8bit_base_runs_on_x_alone_and_the_norm_uses_its_dequantized_weight():
    """On CUDA, Linear8bitLt's forward rounds its input rows to int8 and keeps the columns with an entry over its
    threshold (in any row) in full precision: sending A's rows through it with x (the one-base-call probe) rounds
    W Aᵀ and can change x's own outputs. PEFT calls it on x alone and takes the norm from the dequantized weight;
    this CPU test gives the layers that forward (LLM.int8's arithmetic, in plain torch)."""
    from peft.utils.integrations import dequantize_module_weight

    def int8_forward(layer):
        weight = dequantize_module_weight(layer).clone()

        def forward(x):
            outliers = (x.reshape(-1, x.shape[-1]).abs() > 6.0).any(0)  # (in,): kept in full precision (threshold 6)
            inliers = x.masked_fill(outliers, 0)
            scale = inliers.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
            rounded = (inliers / scale).round() * scale + x * outliers
            return rounded @ weight.T + (layer.bias if layer.bias is not None else 0)
        return forward

    theirs, ours, peft_params, mine, share = _peft_pair_on_bitsandbytes((8, None, False, None), ("q_proj",))
    for model in (theirs, ours):
        q_proj = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj.base_layer"))
        q_proj.forward = int8_forward(q_proj)
    share()
    ids = sample_inputs("llama")["input_ids"]
    torch.testing.assert_close(_logits_and_backward(ours, ids), _logits_and_backward(theirs, ids), atol=1e-5, rtol=1e-5)
    _assert_same_gradients(mine, peft_params)


def test_a_peft_file_with_dora_on_an_embedding_is_refused_pointing_to_peft(tmp_path):
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                                      use_dora=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config.json: DoRA .*Embedding.*an embedding: load it with PEFT"):
        slimtune.load_adapter(tiny_llama(), tmp_path)


def test_contradicting_options_are_refused():
    with pytest.raises(ValueError, match="use_dora=True"):
        slimtune.LoraFAConfig(use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True"):
        slimtune.DeltaLoraConfig(use_dora=True, delta_start_step=0)
    model = tiny_llama()
    with pytest.raises(ValueError, match="Embedding"):
        slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True))
    assert not hasattr(model, "slimtune_state")
    slimtune.add_adapter(model, slimtune.LoraFAConfig(target_modules=["q_proj"]), "fa")  # (plain LoRA: see below)
    with pytest.raises(ValueError, match="already holds a LoraFALinear.*needs a DoraLinear"):
        slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["q_proj"], use_dora=True), "dora")
    assert slimtune.list_adapters(model) == ["fa"]


def test_plain_lora_adapter_can_join_a_dora_layer():
    base = tiny_llama()
    inputs = sample_inputs("llama")
    plain_cfg = slimtune.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    model = slimtune.add_adapter(copy.deepcopy(base),
                                 slimtune.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    slimtune.add_adapter(model, plain_cfg, "plain")
    alone = slimtune.add_adapter(copy.deepcopy(base), plain_cfg)
    alone.load_state_dict({k.replace(".plain.", ".default."): v for k, v in model.state_dict().items()
                           if ".plain." in k}, strict=False)
    slimtune.set_adapter(model, "plain")
    torch.testing.assert_close(logits(model, inputs), logits(alone, inputs), atol=1e-6, rtol=0)


def test_training_lowers_loss_and_keeps_base_weights():
    model = tiny_llama().train()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                               lora_dropout=0.05))
    losses = train_losses(model, sample_inputs("llama", batch=4, seq=16), steps=6, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05
    assert_base_unchanged(model, base)


def test_dora_adapter_can_join_a_plain_lora_layer_as_peft(tmp_path):
    """PEFT holds a plain LoRA and a DoRA adapter on one layer in either order; slimtune turns the LoRA layer into
    a DoRA one holding the same LoRA tensors (an optimizer built before keeps working)."""
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                init_lora_weights=False), adapter_name="p")
    theirs.add_adapter("d", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "magnitude" in name:
                p.mul_(1.3)
    theirs.save_pretrained(tmp_path)
    ours = slimtune.load_adapter(tiny_llama(), tmp_path / "p", "p")
    lora_a = ours.model.layers[0].self_attn.q_proj.lora_A["p"].weight
    slimtune.load_adapter(ours, tmp_path / "d", "d")
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DoraLinear) and layer.lora_A["p"].weight is lora_a
    inputs = sample_inputs("llama")
    theirs.eval()
    for name in ("p", "d"):
        theirs.set_adapter(name)
        slimtune.set_adapter(ours, name)
        torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)
    merged = slimtune.merge_adapter(slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(target_modules=["q_proj"])))
    with pytest.raises(ValueError, match=r"holds merged adapters \['default'\]; a DoraLinear adapter can join it "
                                         "once they are unmerged"):
        slimtune.add_adapter(merged, slimtune.LoraConfig(target_modules=["q_proj"], use_dora=True), "e")
