"""BitFit, selective fine-tuning and LayerDrop: what trains, formulas, training, round trips,
restoring the base, composing with other methods, errors."""

import copy

import pytest
import torch
import transformers
from tiny_models import (
    logits,
    one_thread,  # noqa: F401 (a fixture, used by pytestmark)
    sample_inputs,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

import slimtune
from slimtune.lifecycle import remove_adapter
from slimtune.methods.layerdrop import LayerDropList

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model, family, steps=6, lr=1e-2, labels=None):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = sample_inputs(family, batch=4, seq=12)
    labels = batch["input_ids"] if labels is None else labels
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_bitfit_trains_only_biases_and_counts_them():
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    slimtune.add_adapter(model, slimtune.BitFitConfig())
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert slimtune.trainable_parameters(model).trainable == biases
    losses = _train(model, "gpt2")
    assert losses[-1] < losses[0] - 0.05
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".bias") for n in changed)


def test_bitfit_for_classification_adds_the_head_and_round_trips(tmp_path):
    base = tiny_bert_cls()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.BitFitConfig(task_type="SEQ_CLS"))
    head = sum(p.numel() for p in base.classifier.parameters())
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias") and "classifier" not in n)
    assert slimtune.trainable_parameters(model).trainable == biases + head
    losses = _train(model, "bert", lr=5e-2, labels=torch.tensor([0, 1, 2, 1]))
    assert losses[-1] < losses[0] - 0.05
    slimtune.save_adapter(model, tmp_path)
    loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs("bert")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=0, rtol=0)


def test_removal_restores_the_base_and_merge_keeps_the_training():
    base = tiny_gpt2()
    inputs = sample_inputs("gpt2")
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.BitFitConfig())
    _train(model, "gpt2")
    trained = logits(model, inputs)
    assert (trained - logits(base, inputs)).abs().max() > 1e-3
    with slimtune.disable_adapters(model):
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    torch.testing.assert_close(logits(model, inputs), trained, atol=0, rtol=0)
    merged = slimtune.merge_and_unload(copy.deepcopy(model))
    assert not hasattr(merged, "slimtune_state")
    torch.testing.assert_close(logits(merged, inputs), trained, atol=0, rtol=0)
    slimtune.unload(model)
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    assert all(p.requires_grad for p in model.parameters())  # as before injection


def test_bitfit_on_a_model_without_biases_says_what_to_use():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no bias parameters in LlamaForCausalLM.*SELECTIVE"):
        slimtune.add_adapter(model, slimtune.BitFitConfig())
    assert not hasattr(model, "slimtune_state")


def test_selective_by_parameter_name_and_by_layer():
    model = slimtune.add_adapter(tiny_llama(), slimtune.SelectiveConfig(target_parameters=["input_layernorm.weight",
                                                                                      "post_attention_layernorm.weight"]))
    assert slimtune.trainable_parameters(model).trainable == 2 * 2 * 32
    losses = _train(model, "llama", steps=8, lr=0.3)
    assert losses[-1] < losses[0] - 0.03
    whole = slimtune.add_adapter(tiny_llama(), slimtune.SelectiveConfig(layers_to_transform=[1]))
    layer = whole.model.layers[1]
    assert {n for n, p in whole.named_parameters() if p.requires_grad} == \
        {f"model.layers.1.{n}" for n, _ in layer.named_parameters()}
    modules = slimtune.add_adapter(tiny_llama(),
                                   slimtune.SelectiveConfig(target_modules=["mlp"], layers_to_transform=0))
    assert slimtune.trainable_parameters(modules).trainable == sum(
        p.numel() for p in modules.model.layers[0].mlp.parameters())


def test_selective_combines_with_lora_and_two_sparse_adapters_cannot_share_a_parameter(tmp_path):
    base = tiny_llama()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    slimtune.add_adapter(model, slimtune.SelectiveConfig(target_parameters=["norm.weight"]), "norms")
    slimtune.set_adapter(model, ["default", "norms"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and "model.norm.weight" in trainable
    with pytest.raises(ValueError, match="already trained in place by adapter 'norms'"):
        slimtune.add_adapter(model, slimtune.SelectiveConfig(target_parameters=["model.norm.weight"]), "again")
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    slimtune.save_adapter(model, tmp_path, "norms")
    loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded.model.norm.weight, model.model.norm.weight, atol=0, rtol=0)
    remove_adapter(model, "norms")
    torch.testing.assert_close(model.model.norm.weight, base.model.norm.weight, atol=0, rtol=0)


def test_a_sparse_adapter_applies_only_while_active_or_merged_and_never_inside_disable_adapters(tmp_path):
    base, inputs = tiny_llama(), sample_inputs("llama")
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.SelectiveConfig(target_parameters=["norm.weight"]), "a")
    _train(model, "llama", steps=3, lr=0.3)
    trained = logits(model, inputs)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "b")
    slimtune.save_adapter(model, tmp_path / "b", "b")
    with_b = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "b", "b")
    slimtune.set_adapter(model, "b")  # "a"'s trained norms are base values again
    torch.testing.assert_close(logits(model, inputs), logits(with_b, inputs), atol=0, rtol=0)
    slimtune.save_adapter(model, tmp_path / "a", "a")  # inactive: its file holds the trained values all the same
    loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, inputs), trained, atol=0, rtol=0)
    slimtune.load_adapter(with_b, tmp_path / "a", "a")  # loaded inactive: no change until activated
    torch.testing.assert_close(logits(with_b, inputs), logits(model, inputs), atol=0, rtol=0)
    slimtune.set_adapter(model, "a")
    torch.testing.assert_close(logits(model, inputs), trained, atol=0, rtol=0)
    slimtune.set_adapter(model, ["a", "b"])
    both = logits(model, inputs)
    slimtune.set_adapter(model, "b")
    slimtune.merge_adapter(model, ["a"])  # a merged adapter applies, active or not
    torch.testing.assert_close(logits(model, inputs), both, atol=0, rtol=0)
    with pytest.raises(ValueError, match="'a' is merged into the base weights; call slimtune.unmerge_adapter"):
        slimtune.delete_adapter(model, "a")  # (it baked the values in)
    with slimtune.disable_adapters(model):  # merged, then disabled: the base alone
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    with pytest.warns(UserWarning, match=r"adapter\(s\) \['a'\] are merged into the base weights; unmerging"):
        slimtune.set_adapter(model, "b")  # as a merged LoRA is
    torch.testing.assert_close(logits(model, inputs), logits(with_b, inputs), atol=0, rtol=0)


def test_a_sparse_file_names_base_parameters_whatever_wraps_them(tmp_path):
    # LoRA wrapped q_proj first: the selective adapter's weight is q_proj.base_layer.weight in that model
    base = tiny_llama()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    slimtune.add_adapter(model, slimtune.SelectiveConfig(target_modules=["q_proj"]), "sel")
    slimtune.set_adapter(model, ["default", "sel"])
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(2)
    slimtune.save_adapter(model, tmp_path, "sel")
    alone = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(alone.model.layers[0].self_attn.q_proj.weight,
                               model.model.layers[0].self_attn.q_proj.base_layer.weight, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs target_modules, target_parameters or layers_to_transform"),
    ({"target_parameters": ["nope"]}, "matched no parameter"),
    # each selector given must select something, even when the other does (it was ignored silently)
    ({"target_parameters": ["norm.weight"], "target_modules": [r"nosuch_proj"]},
     r"^target_modules=\['nosuch_proj'\] matched no parameter of this model"),
    ({"target_parameters": ["nope.weight"], "target_modules": "model\\.layers\\.1\\.mlp\\.down_proj"},
     r"^target_parameters=\['nope.weight'\] matched no parameter"),
])
def test_selective_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        slimtune.add_adapter(tiny_llama(), slimtune.SelectiveConfig(**kwargs))


def _count_block_calls(model, blocks):
    calls = []
    handles = [b.register_forward_hook(lambda *_: calls.append(1)) for b in blocks]
    return calls, handles


def test_layerdrop_skips_layers_in_training_only_and_composes_with_lora():
    base = tiny_llama(layers=4)
    inputs = sample_inputs("llama")
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    slimtune.apply_layerdrop(model, 0.5)
    assert isinstance(model.model.layers, LayerDropList)
    assert model.slimtune_state.active == ["default"]  # LoRA stays active and trainable
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert set(model.state_dict()) == set(copy.deepcopy(model).state_dict())
    calls, handles = _count_block_calls(model, list(model.model.layers._modules.values()))
    torch.manual_seed(0)
    model.eval()
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    assert len(calls) == 4
    calls.clear()
    model.train()
    for _ in range(10):
        model(**inputs)
    assert 5 < len(calls) < 35  # about half of 40
    with slimtune.disable_adapters(model):
        calls.clear()
        model(**inputs)
        assert len(calls) == 4
    for h in handles:
        h.remove()
    original = base.model.layers.__class__
    slimtune.unload(model)
    assert type(model.model.layers) is original


def test_layerdrop_on_encoder_decoder_drops_in_both_stacks():
    model = slimtune.add_adapter(tiny_t5(), slimtune.LayerDropConfig(layerdrop=0.3))
    assert isinstance(model.encoder.block, LayerDropList) and isinstance(model.decoder.block, LayerDropList)
    model.train()
    model(**sample_inputs("t5"))


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True])
def test_layerdrop_probability_must_be_in_0_1(bad):
    with pytest.raises(ValueError, match=rf"layerdrop={bad!r} must be a probability in \[0, 1\)"):
        slimtune.LayerDropConfig(layerdrop=bad)


def _gemma2(layers=4):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2)))


TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


class _Identity(torch.nn.Module):
    attention_type = "sliding_attention"  # (block 0's, which transformers 4's Gemma 2 loop reads off the block)

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if TRANSFORMERS_4 else hidden_states  # (as the blocks return it)


def _drop_only(monkeypatch, first_kept: int, blocks: int):
    """Make LayerDrop's draw skip blocks [0, first_kept) of every list and keep the rest."""
    keep = torch.tensor([0.0] * first_kept + [0.9] * (blocks - first_kept))
    monkeypatch.setattr("slimtune.methods.layerdrop.torch.rand", lambda *_: keep[: _[0]])


def test_a_skipped_block_is_the_identity_and_the_others_keep_their_position(monkeypatch):
    # Gemma 2 gives block i the mask of config.layer_types[i] (sliding or full): skipping block 0 must not hand
    # block 1 block 0's sliding-window mask.
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    model, definition = slimtune.apply_layerdrop(_gemma2(), 0.5), _gemma2()
    definition.model.layers[0] = _Identity()
    model.train(), definition.train()
    with torch.no_grad():
        model(ids)  # a block's first call tells what it returns (the hidden states alone here)
        _drop_only(monkeypatch, 1, 4)
        torch.testing.assert_close(model(ids).logits, definition(ids).logits, atol=0, rtol=0)
    from slimtune.optim.layerwise import parameter_depths

    depths, blocks = parameter_depths(model)  # code walking the blocks still finds them all, in order
    assert blocks == 4 and depths["model.layers.3.mlp.up_proj.weight"] == 4


def test_a_skipped_block_keeps_its_attention_type(monkeypatch):
    """transformers 4's Gemma 2 loop reads each block's ``attention_type`` (a mask kind) off the block itself, so
    what runs in a skipped block's place carries it."""
    model = slimtune.apply_layerdrop(_gemma2(), 0.5).train()
    for block, kind in zip(model.model.layers, model.config.layer_types):
        block.attention_type = kind  # (as transformers 4 sets it; 5 reads config.layer_types[i])
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 8)))
    blocks = model.model.layers
    _drop_only(monkeypatch, 2, 4)
    blocks.in_forward = True  # (as inside the model's forward)
    stand_ins = list(blocks)[:2]
    assert [type(b).__name__ for b in stand_ins] == ["PassThrough"] * 2
    assert [b.attention_type for b in stand_ins] == ["sliding_attention", "full_attention"]
    h = torch.randn(1, 8, 32)
    assert all(torch.equal(out[0] if TRANSFORMERS_4 else out, h) for out in (b(h) for b in stand_ins))


def test_a_skipped_block_returning_a_tuple_of_its_output_alone_stands_in_with_a_tuple(monkeypatch):
    """transformers 4's blocks return ``(hidden_states,)``: the stand-in returns the same (a block left out of the
    list instead moved every later block's mask by one)."""
    blocks = torch.nn.ModuleList(_TupleBlock() for _ in range(3))
    owner = torch.nn.Module()
    owner.layers = blocks
    dropped = slimtune.methods.layerdrop.LayerDropList(blocks, 0.5, owner).train()
    h = torch.randn(1, 4, 8)
    for block in blocks:
        dropped._note_output(block, (h,), block(h))
    _drop_only(monkeypatch, 1, 3)
    dropped.in_forward = True
    first = list(dropped)[0]
    assert type(first).__name__ == "PassThrough" and len(list(dropped)) == 3
    out = first(h)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], h)


class _TupleBlock(torch.nn.Module):
    def forward(self, hidden_states):
        return (hidden_states * 2,)


def test_layerdrop_never_skips_a_block_later_blocks_read_from(monkeypatch):
    # T5's first block computes the relative position bias every other block adds: it always runs
    model, base = slimtune.apply_layerdrop(tiny_t5(), 0.5), tiny_t5()
    inputs = sample_inputs("t5")
    for m in (model, base):
        m.train()
        for d in m.modules():
            if isinstance(d, torch.nn.Dropout):
                d.p = 0.0
            if isinstance(getattr(d, "dropout", None), float):  # T5's attention-weight dropout
                d.dropout = 0.0
    with torch.no_grad():
        model(**inputs)
        _drop_only(monkeypatch, 1, 2)
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits)
    # T5's blocks return tuples: a skipped one is left out of the list (a tensor in its place would be misread)
    monkeypatch.setattr("slimtune.methods.layerdrop.torch.rand", lambda *_: torch.tensor([0.9, 0.0]))
    calls, handles = _count_block_calls(model, [model.encoder.block._modules["1"], model.decoder.block._modules["1"]])
    with torch.no_grad():
        model(**inputs)
    assert not calls  # left out of both stacks' loops
    assert len(list(model.encoder.block)) == 2  # code walking the blocks outside the forward sees them all


@pytest.mark.parametrize("config", [slimtune.SelectiveConfig(target_modules=["q_proj"]),
                                    slimtune.SelectiveConfig(layers_to_transform=[1])], ids=["modules", "blocks"])
def test_selective_refuses_quantized_layers_it_would_leave_out(config):
    from slimtune.quant.config import QuantConfig
    from slimtune.quant.model import quantize

    model = quantize(tiny_llama(), QuantConfig())
    with pytest.raises(ValueError, match=r"selects quantized layers \['model.layers.\d.self_attn.q_proj \(4-bit\)'"):
        slimtune.add_adapter(model, config)
    slimtune.add_adapter(model, slimtune.SelectiveConfig(target_parameters=["norm.weight"]))  # full precision: trains


def test_selective_names_the_parameter_a_tied_head_is():
    with pytest.raises(ValueError, match=r"matched no parameter of this model \(lm_head.weight is "
                                         r"model.embed_tokens.weight: select it by that name\)"):
        slimtune.add_adapter(tiny_llama(tie_word_embeddings=True), slimtune.SelectiveConfig(target_modules=["lm_head"]))


def test_a_copy_of_a_layerdrop_model_drops_blocks_itself_and_pickles(tmp_path):
    model = slimtune.apply_layerdrop(tiny_llama(layers=8), 0.5)
    twin = copy.deepcopy(model).train()
    calls, handles = _count_block_calls(twin, list(twin.model.layers._modules.values()))
    torch.manual_seed(0)
    for _ in range(5):
        twin(**sample_inputs("llama"))
    assert len(calls) < 35  # about half of 40 (its hooks moved the original's list: it dropped nothing)
    torch.save(model, tmp_path / "model.pt")  # (lambdas in its hooks could not be pickled)


@pytest.mark.parametrize("rebuild", ["assign", "meta"])
def test_a_sparse_adapter_follows_its_parameters_when_torch_replaces_them(tmp_path, rebuild):
    """load_state_dict(assign=True) and to("meta") + to_empty + load_state_dict put new parameter objects into the
    modules: the adapter kept editing the old ones (its file held untrained values; disable_adapters and unload
    kept the training in the weights)."""
    base, inputs = tiny_gpt2(), sample_inputs("gpt2")
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.BitFitConfig())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    if rebuild == "assign":
        model.load_state_dict(weights, assign=True)
    else:
        model.to("meta").to_empty(device="cpu").load_state_dict(weights)
    _train(model, "gpt2", steps=3, lr=0.3)
    trained = logits(model, inputs)
    assert (trained - logits(base, inputs)).abs().max() > 1e-3
    slimtune.save_adapter(model, tmp_path)
    torch.testing.assert_close(logits(slimtune.load_adapter(copy.deepcopy(base), tmp_path), inputs), trained)
    with slimtune.disable_adapters(model):
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    torch.testing.assert_close(logits(slimtune.unload(model), inputs), logits(base, inputs), atol=0, rtol=0)


def test_a_resized_sparse_parameter_is_refused_by_name_and_changes_nothing():
    """resize_token_embeddings after a selective adapter on the embedding: disable_adapters, unload and
    delete_adapter said "size of tensor a (160) must match …", and disable_adapters left the other adapters
    disabled."""
    model, inputs = tiny_llama(), sample_inputs("llama")
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora")
    slimtune.add_adapter(model, slimtune.SelectiveConfig(target_parameters=["embed_tokens.weight"]), "emb")
    slimtune.set_adapter(model, ["lora", "emb"])
    model.resize_token_embeddings(160)
    adapted = logits(model, inputs)
    message = r"model.embed_tokens.weight is now \(160, 32\) but was \(128, 32\) when its sparse adapter was added"
    other = slimtune.LoraConfig(r=2, target_modules=["v_proj"])
    for operation in (lambda: slimtune.disable_adapters(model).__enter__(), lambda: slimtune.unload(model),
                      lambda: slimtune.delete_adapter(model, "emb"), lambda: slimtune.delete_adapter(model, "lora"),
                      lambda: slimtune.add_adapter(model, other, "new", activate=True),
                      lambda: slimtune.set_adapter(model, "lora"), lambda: slimtune.merge_adapter(model)):
        with pytest.raises(ValueError, match=message):
            operation()
        assert slimtune.list_adapters(model) == ["lora", "emb"] and model.slimtune_state.active == ["lora", "emb"]
        torch.testing.assert_close(logits(model, inputs), adapted, atol=0, rtol=0)


def test_a_sparse_adapter_whose_module_was_replaced_is_refused():
    """resize_token_embeddings replaces an untied output layer: a selective adapter on lm_head kept writing into the
    old module (disable_adapters and unload gave the trained head, the file held the old one), without an error."""
    model = tiny_llama()
    model.config.tie_word_embeddings = False
    slimtune.add_adapter(model, slimtune.SelectiveConfig(target_modules=["lm_head"]))
    model.resize_token_embeddings(200)
    with pytest.raises(ValueError, match=r"the module holding lm_head.weight was replaced since its sparse adapter"):
        slimtune.save_adapter(model, "unused")
    with pytest.raises(ValueError, match=r"the module holding lm_head.weight was replaced"):
        slimtune.disable_adapters(model).__enter__()
    with pytest.raises(ValueError, match=r"the module holding lm_head.weight was replaced"):
        slimtune.unload(model)
