"""The memory model against what slimtune really allocates on tiny models: weights, adapter, optimizer
states and the tensors autograd keeps, counted exactly; and the terms' behaviour (checkpointing, loss)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from conftest import TEST_CPU, make_recipe, tiny_model
from transformers import AutoModelForCausalLM, Gemma2Config, Qwen3MoeConfig

import slimtune
from slimtune.estimate import adapter_layout, device_profile, model_shape, predict, recipe_with
from slimtune.estimate.activations import Precision, activation_model
from slimtune.estimate.memory import optimizer_state_bytes, weight_bytes
from slimtune.optim import make_optimizer, state_bytes
from slimtune.perf.fast_path import enable_fast_path
from slimtune.quant import QuantConfig, QuantizedLinear, quant_summary, quantize
from slimtune.train.runner import add_method

METHODS = {
    "lora": {"peft_type": "LORA", "r": 8, "target_modules": "all-linear"},
    "lora-qv": {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1},
    "dora": {"peft_type": "LORA", "r": 8, "target_modules": "all-linear", "use_dora": True},
    "lora-fa": {"peft_type": "LORA_FA", "r": 8, "target_modules": "all-linear"},
    "vera": {"peft_type": "VERA", "r": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "ia3": {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"]},
    "loha": {"peft_type": "LOHA", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    "lokr": {"peft_type": "LOKR", "r": 4, "target_modules": "all-linear"},
    "lokr-both": {"peft_type": "LOKR", "r": 1, "target_modules": "all-linear", "decompose_both": True},
    "prompt": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8},
    "bottleneck": {"peft_type": "BOTTLENECK"},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_adapter_parameters_equal_what_add_adapter_trains(name, tiny_folder):
    recipe = make_recipe(tiny_folder, METHODS[name])
    layout = adapter_layout(model_shape(tiny_folder), recipe.method)
    model = tiny_model()
    slimtune.add_adapter(model, recipe.method)
    report = slimtune.trainable_parameters(model)
    assert layout.trainable_params == report.trainable > 0
    assert layout.trainable_bytes == 4 * report.trainable


@pytest.mark.parametrize("quant", [QuantConfig(), QuantConfig(double_quant=False, blocksize=128), QuantConfig(bits=8)],
                         ids=["nf4-dq", "nf4-nodq-128", "int8"])
def test_quantized_weight_bytes_equal_what_quantize_stores(quant, tiny_folder):
    shape = model_shape(tiny_folder)
    model = quantize(tiny_model(), quant)
    summary = quant_summary(model)
    stored, rest, count = weight_bytes(shape, quant, weight_size=4)
    codebooks = (16 * 4 + (256 * 4 if quant.double_quant else 0)) if quant.bits == 4 else 0
    assert count == summary.params
    assert stored - codebooks * summary.layers == summary.bytes_after
    kept = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" in n)
    assert rest == kept  # embeddings (tied head), norms and buffers in fp32


def test_output_head_stays_full_precision_and_tied_head_counts_once(tiny_folder):
    shape = model_shape(tiny_folder)
    assert shape.tied and shape.head_name == "lm_head"
    assert "lm_head" not in {s.name for s in shape.quantized_linears(QuantConfig())}
    assert shape.params == sum(p.numel() for p in tiny_model().parameters())


def test_the_estimate_counts_as_quantized_exactly_the_layers_quantize_replaces(tiny_folder, monkeypatch):
    """One rule (``skipped_linear_names``): the model's _keep_in_fp32_modules stay full precision in both."""
    shape = model_shape(tiny_folder)
    monkeypatch.setattr(shape.meta, "_keep_in_fp32_modules", ["down_proj"], raising=False)
    model = tiny_model()
    model._keep_in_fp32_modules = ["down_proj"]
    quantize(model, QuantConfig())
    replaced = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert replaced and not any(n.endswith("down_proj") for n in replaced)
    assert {s.name for s in shape.quantized_linears(QuantConfig())} == replaced


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward (PyTorch's own account)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("name", ["lora", "lora-qv", "dora", "lora-fa", "lokr", "lokr-both"])
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("fused", [False, True], ids=["layers", "fused"])
def test_activations_equal_the_tensors_autograd_keeps(name, quantized, fused, tiny_folder):
    seq = 48
    recipe = make_recipe(tiny_folder, METHODS[name])
    shape = model_shape(tiny_folder)
    layout = adapter_layout(shape, recipe.method)
    predicted = activation_model(shape, layout, 1, seq, Precision(4, False, quantized, fused=fused), False)
    model = tiny_model()
    if quantized:
        quantize(model, QuantConfig())
    slimtune.add_adapter(model, recipe.method)
    enable_fast_path(model, "auto" if fused else "torch")  # on a CPU, auto: the fused LoRA nodes
    assert predicted.saved == _saved_bytes(model, torch.randint(0, 512, (1, seq)))


def test_each_device_gets_the_fast_path_slimtune_train_takes_there(tiny_folder):
    qlora = make_recipe(tiny_folder, quantization={"bits": 4})
    cases = {(TEST_CPU, "auto"): (True, False), (TEST_CPU, "torch"): (False, False),
             (device_profile("h200"), "auto"): (True, True), (device_profile("h200"), "torch"): (False, False)}
    for (device, kernels), (fused, triton) in cases.items():
        est = predict(recipe_with(qlora, [f"training.kernels={kernels}"]), device, timing=False)
        assert (est.precision.fused, est.precision.triton) == (fused, triton), (device.name, kernels)
        if device.kind == "cpu":  # the fused nodes decode into the same reused buffers as the plain layers
            assert any(c.label == "4-bit decode buffers" for c in est.memory.components)
    auto = predict(qlora, TEST_CPU, timing=False)
    kept = predict(recipe_with(qlora, ["training.keep_dequantized=true"]), TEST_CPU, timing=False)
    weights = sum(q.in_features * q.out_features for q in model_shape(tiny_folder).quantized_linears(QuantConfig())
                  if not q.name.endswith(("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
                                          "layers.0.self_attn.v_proj")))
    # the fused nodes keep every decoded weight whose input needs a gradient (not layer 0's q/k/v) in fp32
    assert kept.memory.component("activations") - auto.memory.component("activations") == 4 * weights


@pytest.mark.parametrize("name", ["lora", "lora-qv"])
def test_activations_under_bf16_autocast(name, tiny_folder):
    """The GPU's default (bf16 autocast, 4-bit base in bf16), checked on the CPU's autocast: within 2%."""
    seq = 48
    recipe = make_recipe(tiny_folder, METHODS[name])
    shape = model_shape(tiny_folder)
    layout = adapter_layout(shape, recipe.method)
    predicted = activation_model(shape, layout, 1, seq, Precision(4, True, True), False)
    model = quantize(tiny_model(), QuantConfig(compute_dtype="bfloat16"))
    slimtune.add_adapter(model, recipe.method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _saved_bytes(model, torch.randint(0, 512, (1, seq)))
    assert measured == pytest.approx(predicted.saved, rel=0.02)


def test_checkpointing_keeps_only_layer_inputs(tiny_folder):
    shape = model_shape(tiny_folder)
    plain, ckpt = (predict(make_recipe(tiny_folder, model={"gradient_checkpointing": c}), TEST_CPU, timing=False)
                   for c in (False, True))
    assert ckpt.memory.component("activations") < plain.memory.component("activations")
    tokens = 64
    layers_inputs = shape.layers * tokens * shape.hidden * 4
    outside = tokens * shape.hidden * 4 + tokens * 4  # the final norm's input and rsqrt
    assert ckpt.memory.component("activations") == layers_inputs + outside
    model = tiny_model()
    add_method(model, make_recipe(tiny_folder, model={"gradient_checkpointing": True}))
    assert _saved_bytes(model, torch.randint(0, 512, (1, tokens))) == layers_inputs + outside


def test_chunked_loss_removes_the_full_vocabulary_logits(tiny_folder):
    seq = 256
    full, chunked = (predict(make_recipe(tiny_folder, data={"max_seq_length": seq}, training={"loss": mode}),
                             TEST_CPU, timing=False) for mode in ("full", "auto"))
    assert not full.chunked and chunked.chunked
    labels = {c.label for c in full.memory.components}
    assert "loss (full logits)" in labels and "loss (full logits)" not in {c.label for c in chunked.memory.components}
    vocab = 512
    assert full.memory.component("logits") >= 3 * (seq - 1) * vocab * 4
    assert chunked.memory.component("logits") < full.memory.component("logits")
    assert chunked.memory.train_peak < full.memory.train_peak


def test_a_softcapped_models_chunked_loss_counts_the_capped_logits_beside_the_raw_ones(tmp_path):
    """LogitTransform.apply writes cap · tanh(z / cap) into a second chunk-sized fp32 buffer (z's own keeps the
    slope for backward): the estimate counted one."""
    seq, vocab = 64, 512

    def logits(cap):
        folder = tmp_path / str(cap)
        Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, head_dim=16,
                     num_attention_heads=4, num_key_value_heads=2, final_logit_softcapping=cap).save_pretrained(folder)
        return predict(make_recipe(folder, data={"max_seq_length": seq}), TEST_CPU, timing=False)

    capped, plain = logits(30.0), logits(None)
    assert capped.chunked and plain.chunked
    assert capped.memory.component("logits") - plain.memory.component("logits") == (seq - 1) * vocab * 4


def test_an_evaluation_batch_larger_than_the_training_batch_sets_the_peak(tiny_folder):
    # slimtune train evaluates the base model first, at training.eval_batch_size, with no gradients: its loss's
    # full-vocabulary logits at 16 rows outgrow a training step of 1 row (measured: -73% without this term)
    seq, vocab = 256, 512

    def peak(eval_batch, loss="full"):
        return predict(make_recipe(tiny_folder, data={"max_seq_length": seq, "max_eval_examples": 64},
                                   training={"loss": loss, "batch_size": 1, "eval_batch_size": eval_batch}),
                       TEST_CPU, timing=False).memory

    small, large = peak(1), peak(16)
    assert small.component("evaluation") == 0 and large.component("evaluation") > 0
    logits = 16 * seq * vocab * 4
    assert large.component("evaluation") > 3 * logits  # logits, their label rows' copy and the log-softmax
    assert large.train_peak - small.train_peak > 2 * logits
    assert peak(16, "auto").train_peak < large.train_peak  # chunked: the evaluation's loss is chunked too
    capped = predict(make_recipe(tiny_folder, data={"max_seq_length": seq, "max_eval_examples": 1},
                                 training={"loss": "full", "batch_size": 1, "eval_batch_size": 16}),
                     TEST_CPU, timing=False).memory
    assert capped.train_peak == small.train_peak  # one evaluation row makes one-row batches


def test_prompt_tuning_cannot_use_the_chunked_loss(tiny_folder):
    est = predict(make_recipe(tiny_folder, METHODS["prompt"]), TEST_CPU, timing=False)
    assert not est.chunked and est.layout.virtual_tokens == 8


@pytest.mark.parametrize("router_logits", [False, True])
def test_an_moe_training_its_router_balance_cannot_use_the_chunked_loss(tmp_path, router_logits):
    """The trainer keeps the model's own loss (full logits) for a mixture of experts that adds its router
    load-balancing loss; the estimate counts those logits too."""
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           output_router_logits=router_logits)
    config.save_pretrained(tmp_path)
    est = predict(make_recipe(tmp_path), TEST_CPU, timing=False)
    assert est.chunked is not router_logits


def test_virtual_tokens_add_logits_rows_but_no_scored_rows(tiny_folder):
    """Prompt tuning's virtual tokens get logits (the model's output covers them) but no labels: the loss
    copies and log-softmaxes the text's label rows only (train.losses.loss_sum), so against LoRA with the
    full loss on the same rows the loss term grows by the virtual tokens' fp32 logits and nothing more."""
    seq, virtual, vocab = 64, 8, 512
    data, training = {"max_seq_length": seq}, {"loss": "full"}
    prompt = predict(make_recipe(tiny_folder, {**METHODS["prompt"], "num_virtual_tokens": virtual}, data=data,
                                 training=training), TEST_CPU, timing=False)
    lora = predict(make_recipe(tiny_folder, data=data, training=training), TEST_CPU, timing=False)
    assert prompt.memory.component("logits") - lora.memory.component("logits") == virtual * vocab * 4


@pytest.mark.parametrize("optim", ["adamw", "adamw_8bit"])
def test_optimizer_state_bytes_equal_the_optimizers(optim, tiny_folder):
    recipe = make_recipe(tiny_folder, {**METHODS["lora"], "r": 32})  # 32 × 160 ≥ 4096: some stored in 8 bits
    layout = adapter_layout(model_shape(tiny_folder), recipe.method)
    model = tiny_model()
    slimtune.add_adapter(model, recipe.method)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optim, params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    device, host = optimizer_state_bytes(optim, layout.trainable, paged_off_device=False)
    assert host == 0 and device == state_bytes(optimizer)


def test_paged_states_leave_the_gpu(tiny_folder):
    layout = adapter_layout(model_shape(tiny_folder), make_recipe(tiny_folder, {**METHODS["lora"], "r": 1024}).method)
    on_gpu = optimizer_state_bytes("paged_adamw", layout.trainable, paged_off_device=True)
    on_cpu = optimizer_state_bytes("paged_adamw", layout.trainable, paged_off_device=False)
    assert on_gpu[1] > 0 and on_gpu[0] + on_gpu[1] == on_cpu[0] and on_cpu[1] == 0


def test_components_add_up_to_the_peak(tiny_folder):
    for recipe in (make_recipe(tiny_folder), make_recipe(tiny_folder, quantization={"bits": 4}),
                   make_recipe(tiny_folder, training={"optim": "paged_adamw_8bit", "loss": "full"},
                               model={"gradient_checkpointing": "offload"})):
        for device in (TEST_CPU, "h200"):
            est = predict(recipe, TEST_CPU if device == TEST_CPU else device_profile(device),
                          timing=False)
            mem = est.memory
            assert sum(c.bytes for c in mem.components if c.on_device) == mem.train_peak
            assert mem.host_extra == sum(c.bytes for c in mem.components if not c.on_device)
            assert est.peak == max(mem.train_peak, mem.load_peak)


def test_a_mixture_of_experts_is_estimated_as_it_loads_whole_with_its_experts_unquantized(tmp_path):
    """transformers 5 fuses experts into 3-D tensors: 4-bit loading reads such a checkpoint whole, then quantizes
    the linear layers; the experts stay full precision. The estimate must count both."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimtune.estimate.report import format_estimate
    from slimtune.train.models import load_model

    config = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    shape = model_shape(tmp_path / "moe")
    model = load_model(tmp_path / "moe", quantization=QuantConfig(compute_dtype="float32"))
    experts = sum(p.numel() for n, p in model.named_parameters() if "experts" in n and p.dim() == 3)
    assert shape.fused_expert_params == experts  # what the loader leaves unquantized
    assert quant_summary(model).params == sum(
        s.in_features * s.out_features for s in shape.quantized_linears(QuantConfig()))
    est = predict(make_recipe(tmp_path / "moe", quantization={"bits": 4}), TEST_CPU, timing=False)
    overhead = sum(c.bytes for c in est.memory.components
                   if c.key == "overhead" and c.on_device and c.label != "allocator slack")  # the process's own
    report = format_estimate(est)
    if int(transformers.__version__.split(".")[0]) < 5:  # experts are linear layers, streamed like the rest
        assert experts == 0 and est.memory.load_peak < shape.params * 4 + overhead and "fused experts" not in report
        return
    assert experts > 0
    assert est.memory.load_peak == shape.params * 4 + overhead  # the whole fp32 model first
    assert "the whole model in full precision, then quantized" in report and "in fused experts" in report


def test_a_model_without_a_causal_lm_class_is_a_clear_error(tmp_path):
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 't5' has no causal-LM class in transformers: `slimtune train`"):
        predict(make_recipe(tmp_path), TEST_CPU, timing=False)


def test_a_folder_bitsandbytes_quantized_is_counted_as_stored(tiny_folder, tmp_path):
    """Its layers load as stored whatever the recipe says: it was counted in full precision without a quantization
    section (7× the weights of a 4-bit model), and as the section's bits with one."""
    folder = shutil.copytree(tiny_folder, tmp_path / "bnb-4bit")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (folder / "config.json").write_text(json.dumps(config))
    as_quantized = predict(make_recipe(tiny_folder, quantization={"bits": 4}), TEST_CPU, timing=False)
    for section in (None, {"bits": 8}):
        stored = predict(make_recipe(folder, quantization=section), TEST_CPU, timing=False)
        assert stored.memory.component("weights") == as_quantized.memory.component("weights") > 0
        assert stored.recipe.quantization is not None and stored.recipe.quantization.bits == 4


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="transformers 4: a module per expert")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
def test_adapted_expert_weights_count_as_kept_for_backward(tmp_path, checkpointing):
    """LoRA on fused experts (target_parameters) makes W + s·B A per block, which the experts keep for backward:
    the estimate counts every block's (one block's, recomputed under checkpointing) as autograd keeps them."""
    config = Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                            num_experts_per_tok=2, head_dim=16, decoder_sparse_step=1)
    config.save_pretrained(tmp_path)
    experts = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "lora_dropout": 0.0,
               "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
    est = predict(make_recipe(tmp_path, experts, model={"gradient_checkpointing": checkpointing}), TEST_CPU,
                  timing=False)
    kept = next(c.bytes for c in est.memory.components if c.label == "adapted weights kept for backward")
    per_block = 4 * 8 * (2 * 32 * 64 + 64 * 32)  # fp32 (experts, 2·inner, hidden) + (experts, hidden, inner)
    assert kept == per_block * (1 if checkpointing else 3)
    if not checkpointing:  # what autograd keeps beyond a q_proj-only adapter: the adapted stacks, and the routed
        # activations the experts' weight gradients need (not estimated: 19% of the stacks here)
        measured = []
        for method in (experts, {**experts, "target_parameters": None}):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).train()
            slimtune.add_adapter(model, slimtune.config_from_dict(method))
            measured.append(_saved_bytes(model, torch.randint(0, 512, (1, 48))))
        assert kept <= measured[0] - measured[1] <= 1.25 * kept
