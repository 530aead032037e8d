"""Activation checkpointing of decoder layers: same gradients, less kept for backward, optional CPU offload."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

import slimtune
from slimtune.core.modules import transformer_blocks
from slimtune.perf.activation_checkpointing import (
    CheckpointedForward,
    HostOffload,
    KeptInputs,
    checkpoint_layers,
    uncheckpoint_layers,
)
from slimtune.perf.fused_lora import use_fused_lora
from slimtune.quant import QuantConfig, quantize


def _lora_model(factory=tiny_llama, dropout=0.2, **kwargs):
    model = factory(**kwargs)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False, lora_dropout=dropout))
    return model.train()


def _run(model, ids):
    """Loss, trainable gradients and the bytes autograd keeps (shared storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(7)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(storages.values())


IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("offload", [False, True])
def test_same_gradients_with_dropout_and_much_less_kept(offload):
    model = _lora_model(layers=3)
    checked = copy.deepcopy(model)
    assert checkpoint_layers(checked, offload=offload) == [f"model.layers.{i}" for i in range(3)]
    loss_ref, grads_ref, kept_ref = _run(model, IDS)
    loss, grads, kept = _run(checked, IDS)
    assert torch.equal(loss, loss_ref)  # the recomputation replays the same dropout masks
    for key in grads_ref:
        torch.testing.assert_close(grads[key], grads_ref[key], rtol=1e-6, atol=1e-7, msg=key)
    assert kept < kept_ref / 4, (kept, kept_ref)


def test_quantized_fused_lora_and_gpt2_blocks():
    base = tiny_llama()
    quantize(base, QuantConfig(compute_dtype="float32"))
    slimtune.add_adapter(base, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False))
    base.train()
    checked = copy.deepcopy(base)
    use_fused_lora(checked)
    checkpoint_layers(checked)
    _, grads_ref, _ = _run(base, IDS)
    _, grads, _ = _run(checked, IDS)
    for key in grads_ref:
        torch.testing.assert_close(grads[key], grads_ref[key], rtol=1e-5, atol=1e-6, msg=key)
    gpt2 = _lora_model(tiny_gpt2, dropout=0.0)
    checked = copy.deepcopy(gpt2)
    assert checkpoint_layers(checked) == ["transformer.h.0", "transformer.h.1"]
    _, grads_ref, _ = _run(gpt2, IDS)
    _, grads, _ = _run(checked, IDS)
    for key in grads_ref:
        torch.testing.assert_close(grads[key], grads_ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_eval_is_untouched_and_undo_restores():
    model = _lora_model()
    checkpoint_layers(model)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    assert uncheckpoint_layers(model) == 2
    assert not any(isinstance(m.__dict__.get("forward"), CheckpointedForward) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, out)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, scale):
        return self.lin(x) * scale


def test_other_inputs_needing_grad_fall_back_and_errors():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([_Block(), _Block()])
    reference = copy.deepcopy(blocks)
    assert [n for n, _ in transformer_blocks(blocks)] == ["0", "1"]
    checkpoint_layers(blocks)
    x = torch.randn(3, 8)
    scales = [torch.tensor(2.0, requires_grad=True) for _ in range(2)]  # a second input that needs a gradient
    for model, scale in ((blocks, scales[0]), (reference, scales[1])):
        h = x
        for block in model:
            h = block(h, scale)
        h.sum().backward()
    torch.testing.assert_close(scales[0].grad, scales[1].grad)
    torch.testing.assert_close(blocks[0].lin.weight.grad, reference[0].lin.weight.grad)
    with pytest.raises(ValueError, match="found no decoder layers"):
        checkpoint_layers(torch.nn.Linear(2, 2))
    hf = tiny_llama()
    (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="already on"):
        checkpoint_layers(hf)


class _Watched(HostOffload):
    """HostOffload on a machine where CPU tensors count as accelerator tensors: the real offload code
    runs (copies out after each layer's forward, back before its recomputation) and each call is recorded."""

    on_accelerator = staticmethod(lambda t: True)

    def __init__(self):
        self.events, self.inputs = [], []

    def stash(self, hidden):
        kept = super().stash(hidden)
        self.events.append(("stash", kept.data_ptr()))
        self.inputs.append(weakref.ref(hidden))
        return kept

    def restore(self, kept, device):
        self.events.append(("restore", kept.data_ptr()))
        return super().restore(kept, device)


class _Plain(KeptInputs):
    def __init__(self):
        self.inputs = []

    def stash(self, hidden):
        self.inputs.append(weakref.ref(hidden))
        return hidden


def test_offload_keeps_copies_frees_the_layer_inputs_and_brings_each_back_once():
    """What offload must do, through the device-independent seam: after the forward no layer input is
    alive (only their host copies), each copy comes back exactly once, in reverse layer order, and the
    gradients are those of the un-checkpointed model. Without offload the inputs themselves are kept."""
    model = _lora_model(layers=3, dropout=0.0)
    _, grads_ref, _ = _run(copy.deepcopy(model), IDS)
    for store in (_Watched(), _Plain()):
        checked = copy.deepcopy(model)
        checkpoint_layers(checked, offload=store)
        loss = checked(input_ids=IDS, labels=IDS).loss
        gc.collect()
        alive = [ref() is not None for ref in store.inputs]
        assert alive == [isinstance(store, _Plain)] * 3, alive
        if isinstance(store, _Watched):
            stashed = [ptr for kind, ptr in store.events if kind == "stash"]
            assert len(stashed) == 3 and all(kind == "stash" for kind, _ in store.events)
        loss.backward()
        if isinstance(store, _Watched):
            restored = [ptr for kind, ptr in store.events if kind == "restore"]
            assert restored == stashed[::-1]
        for key, grad in grads_ref.items():
            torch.testing.assert_close(dict(checked.named_parameters())[key].grad, grad, rtol=1e-5, atol=1e-6)


def test_offload_is_a_no_op_for_cpu_tensors_and_chosen_by_the_flag():
    hidden = torch.randn(2, 3)
    assert HostOffload().stash(hidden) is hidden and HostOffload().restore(hidden, hidden.device) is hidden
    model = _lora_model(layers=2)
    checkpoint_layers(model, offload=True)
    kinds = {type(m.__dict__["forward"].inputs) for m in model.modules() if "forward" in m.__dict__}
    assert kinds == {HostOffload}
    checkpoint_layers(model, offload=False)
    kinds = {type(m.__dict__["forward"].inputs) for m in model.modules() if "forward" in m.__dict__}
    assert kinds == {KeptInputs}


@pytest.mark.gpu
def test_gpu_offload_moves_layer_inputs_out_of_gpu_memory():
    ids = torch.randint(3, 128, (8, 128), generator=torch.Generator().manual_seed(0)).cuda()  # 128 KiB per input
    peaks, grads = {}, {}
    for offload in (False, True):
        model = _lora_model(layers=4, dropout=0.0).cuda()
        checkpoint_layers(model, offload=offload)
        torch.manual_seed(0)
        loss = model(input_ids=ids, labels=ids).loss
        kept = torch.cuda.memory_allocated()
        loss.backward()
        peaks[offload] = kept
        grads[offload] = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert peaks[True] < peaks[False]
    for key in grads[False]:
        torch.testing.assert_close(grads[True][key], grads[False][key])
