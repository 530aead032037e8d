"""Chunked cross-entropy against F.cross_entropy on full logits, and its memory bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama, tiny_t5
from torch.utils._python_dispatch import TorchDispatchMode

import slimtune
from slimtune.perf.losses import causal_lm_loss, chunked_cross_entropy, chunked_head_cross_entropy, default_chunk_size


def _problem(tokens=50, hidden=32, vocab=300, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(vocab, hidden, dtype=dtype, generator=g).requires_grad_()
    b = torch.randn(vocab, dtype=dtype, generator=g).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[::3] = -100
    return h, w, b, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_equals_full_logits_cross_entropy(reduction, chunk_size):
    h, w, b, y = _problem()
    ref = F.cross_entropy(h @ w.T + b, y, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    loss = chunked_cross_entropy(h, w, y, b, chunk_size=chunk_size, reduction=reduction)
    grads = torch.autograd.grad(loss * 3.0, (h, w, b))  # the upstream gradient scales the stored ones
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, 3.0 * want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True])
def test_half_precision_path_matches_fp32_reference(autocast):
    """bf16 operands (or bf16 autocast): matmuls in bf16, logits and sums in fp32; gradients as fp32's, to bf16
    rounding (the weight's gradient is summed over chunks in fp32)."""
    h, w, b, y = _problem(tokens=60, hidden=32, vocab=200, dtype=torch.float32)
    if not autocast:
        h, w, b = (t.detach().bfloat16().requires_grad_() for t in (h, w, b))
    ref_inputs = [t.detach().bfloat16().float().requires_grad_() for t in (h, w, b)]
    ref = F.cross_entropy(ref_inputs[0] @ ref_inputs[1].T + ref_inputs[2], y)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = chunked_cross_entropy(h, w, y, b, chunk_size=16)
    grads = torch.autograd.grad(loss, (h, w, b))
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == (torch.bfloat16 if not autocast else torch.float32)
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-3)


def test_fp32_batched_shape_without_bias_and_frozen_weight():
    h, w, _, y = _problem(tokens=24, dtype=torch.float32)
    w.requires_grad_(False)
    h3, y3 = h.detach().view(2, 12, 32).requires_grad_(), y.view(2, 12)
    loss = chunked_cross_entropy(h3, w, y3, chunk_size=5)
    loss.backward()
    h_ref = h3.detach().clone().requires_grad_()
    ref = F.cross_entropy((h_ref @ w.T).view(-1, 300), y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h3.grad, h_ref.grad)


def test_all_ignored_and_no_grad():
    h, w, b, y = _problem()
    y[:] = -100
    assert torch.isnan(chunked_cross_entropy(h, w, y)).item() and torch.isnan(F.cross_entropy(h @ w.T, y)).item()
    total = chunked_cross_entropy(h, w, y, reduction="sum")
    assert total.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(total, h)[0]) == 0
    with torch.no_grad():
        _, w2, _, y2 = _problem()
        assert chunked_cross_entropy(h, w2, y2).item() == pytest.approx(F.cross_entropy(h @ w2.T, y2).item())


def test_errors_name_the_bad_value():
    h, w, b, y = _problem()
    y[4] = 300
    with pytest.raises(ValueError, match="label 300 is outside the vocabulary"):
        chunked_cross_entropy(h, w, y)
    with pytest.raises(ValueError, match="reduction='none'"):
        chunked_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        chunked_cross_entropy(h, w, y[:-1])


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materializes_the_full_logits():
    h, w, b, y = _problem(tokens=400, vocab=1000, dtype=torch.float32)
    with _LargestTensor() as mode:
        chunked_cross_entropy(h, w, y, b, chunk_size=32).backward()
    assert mode.largest <= 32 * 1000 < 267 * 1000  # one chunk of logits; 267 label tokens in all
    with _LargestTensor() as mode:
        F.cross_entropy(h @ w.T + b, y).backward()
    assert mode.largest == 400 * 1000
    assert default_chunk_size(128256) == 523 and default_chunk_size(10**9) == 16


class _LogitPasses(TorchDispatchMode):
    """Records, for the ops that take or make a tensor of ``shape`` (one chunk's logits), the new tensors of
    that shape (not an input written in place) and the exponentials taken over one."""

    EXP = ("exp", "exp_", "logsumexp", "softmax", "_softmax", "log_softmax", "_log_softmax")

    def __init__(self, shape):
        super().__init__()
        self.shape, self.buffers, self.exps = torch.Size(shape), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        if func.__name__.split(".")[0] in self.EXP and any(a.shape == self.shape for a in inputs):
            self.exps += 1
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.shape == self.shape and t.untyped_storage().data_ptr() not in storages:
                self.buffers += 1
        return out


@pytest.mark.parametrize("grad", [True, False])
def test_one_logits_buffer_and_one_exp_pass_per_chunk(grad):
    """The softmax and the logsumexp are written into the chunk's logits with one exponential: torch.logsumexp
    and then exp(z − lse) took two passes of exp over the vocabulary (and a temporary as large as the logits)."""
    h, w, b, y = _problem(tokens=64, vocab=1000, dtype=torch.float32)
    y[:] = 1  # every token a label: 64 label tokens, 4 chunks of 16
    with torch.set_grad_enabled(grad), _LogitPasses((16, 1000)) as mode:
        loss = chunked_cross_entropy(h, w, y, b, chunk_size=16)
    assert (mode.buffers, mode.exps) == (4, 4)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.T + b, y), rtol=1e-5, atol=1e-5)


def test_masked_vocabulary_entries():
    """Logits of -inf (a bias masking part of the vocabulary) give the same loss and gradients as on full logits."""
    h, w, b, y = _problem(tokens=30, vocab=200, dtype=torch.float64)
    with torch.no_grad():
        b[150:] = float("-inf")
    y[y >= 150] = 3
    ref = F.cross_entropy(h @ w.T + b, y)
    ref_grads = torch.autograd.grad(ref, (h, w))
    loss = chunked_cross_entropy(h, w, y, b, chunk_size=7)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(torch.autograd.grad(loss, (h, w)), ref_grads):
        torch.testing.assert_close(got, want)


class _ZeroFilled(TorchDispatchMode):
    """Records the sizes of the zero-filled tensors created (the chunked loss's gradient buffers)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "zero" in func.__name__:
            self.sizes.append(out.numel())
        return out


def test_no_gradient_buffers_without_grad_mode():
    """Under torch.no_grad() (evaluation of a model whose head trains) the loss built the hidden states' and the
    weight's gradient buffers all the same: a Function's needs_input_grad ignores the caller's grad mode."""
    h, w, b, y = _problem(tokens=40, vocab=50, dtype=torch.float32)
    w.requires_grad_(True)
    with torch.no_grad(), _ZeroFilled() as mode:
        chunked_cross_entropy(h, w, y, b, chunk_size=8)
    assert h.numel() not in mode.sizes and w.numel() not in mode.sizes and b.numel() not in mode.sizes
    with _ZeroFilled() as mode:
        chunked_cross_entropy(h, w, y, b, chunk_size=8)
    assert w.numel() in mode.sizes  # (the recorder sees them when gradients are wanted)


def _model_loss_sum(model, batch):
    labels = batch["labels"]
    out = model(**batch)
    return out.loss * int((labels[:, 1:] != -100).sum())


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    mask = torch.ones_like(ids)
    mask[1, -3:], labels[1, -3:] = 0, -100  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_causal_lm_loss_equals_the_models_own_loss(target_modules):
    model = tiny_llama()
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                               init_lora_weights=False))
    batch = _batch()
    ref = _model_loss_sum(model, batch)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    loss = causal_lm_loss(model, batch, chunk_size=5)  # a LoRA lm_head takes the checkpointed-chunk path
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    mean = causal_lm_loss(model, batch, reduction="mean")
    torch.testing.assert_close(mean, model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_head_path_matches_the_weight_path():
    h, w, b, y = _problem(dtype=torch.float32)
    head = torch.nn.Linear(32, 300)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    torch.testing.assert_close(chunked_head_cross_entropy(h, head, y, 300, chunk_size=8),
                               chunked_cross_entropy(h, head.weight, y, head.bias, chunk_size=8))


def test_a_trained_head_gets_a_graph_from_a_batch_without_label_tokens():
    """No label token in a micro-batch (all prompt, say) with a trained output layer: the loss is 0 with a graph
    to the layer, as transformers' own loss is, so backward runs and gives zero gradients (it raised)."""
    h = torch.randn(2, 5, 32)
    head = torch.nn.Linear(32, 300)
    total = chunked_head_cross_entropy(h, head, torch.full((2, 5), -100), 300, reduction="sum")
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    assert torch.count_nonzero(head.weight.grad) == 0


def _transformed_head_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type!r} models")

    setting = {"gemma2": {"final_logit_softcapping": 0.5, "head_dim": 8}, "cohere": {"logit_scale": 4.0},
               "granite": {"logits_scaling": 0.25}, "hyperclovax": {"logits_scaling": 4.0},
               "falcon_h1": {"lm_head_multiplier": 0.25, "head_dim": 8, "mamba_d_ssm": 32, "mamba_n_heads": 4,
                             "mamba_d_head": 8, "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_chunk_size": 8},
               }[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **setting)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["weight", "head"])
@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite", "hyperclovax", "falcon_h1"])
def test_transformed_logits_match_the_models_own_loss(model_type, target_modules):
    """Gemma 2 soft-caps its logits (cap · tanh(z / cap)), Cohere multiplies them, Granite divides them by
    logits_scaling, HyperCLOVAX multiplies them by it, Falcon-H1 by lm_head_multiplier: the chunked loss applies the
    same transform, with its gradient (the caps and scales here are far from 1)."""
    model = _transformed_head_model(model_type)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                                    init_lora_weights=False))
    batch = _batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref = _model_loss_sum(model, batch)
    ref_grads = torch.autograd.grad(ref, trainable)
    loss = causal_lm_loss(model, batch, chunk_size=5)
    grads = torch.autograd.grad(loss, trainable)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_causal_lm_loss_refuses_what_it_would_get_wrong():
    with pytest.raises(ValueError, match="no output embeddings / decoder"):  # T5's decoder needs its encoder
        causal_lm_loss(tiny_t5(), {"input_ids": torch.randint(3, 128, (2, 5)), "labels": torch.randint(3, 128, (2, 5))})
    model = tiny_llama()
    model.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match="forward hooks"):
        causal_lm_loss(model, _batch())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_large_logits_keep_the_loss_to_fp32_rounding(reduction):
    """The loss is summed row by row as lse − z[y]: summing Σ lse and Σ z[y] apart and subtracting lost about
    C·|z|·eps (here 3.6e-5 relative, ten times the 3.3e-6 of the rows' own fp32 rounding at logits near 1e4)."""
    h, w, b, y = _problem(tokens=512, hidden=16, vocab=64, dtype=torch.float32)
    y[:] = torch.arange(512) % 64
    with torch.no_grad():
        b.fill_(1e4)  # every logit shifted: the loss does not change, the rounding of large sums does
    want = F.cross_entropy((h @ w.T + b).double(), y, reduction=reduction)
    got = chunked_cross_entropy(h, w, y, b, chunk_size=512, reduction=reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
