"""HF PEFT as the oracle: same weights → same outputs, and adapter files that move both ways."""

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES, logits, sample_inputs, tiny_bart_cls, tiny_bert_cls, tiny_llama, tiny_llama_cls

import slimtune
from slimtune.gguf_export import write_gguf_lora

TOL = 1e-5


def _peft_pair(family: str, **extra):
    builder, targets, kwargs = FAMILIES[family]
    base = builder()
    kwargs = {**kwargs, **extra}
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs))
    config = slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kwargs)
    ours = slimtune.add_adapter(copy.deepcopy(base), config)
    # Copy PEFT's random adapter (and head copy) into ours: in-memory names differ only by the prefix.
    theirs = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items()}
    ours_sd = ours.state_dict()
    shared = {k: theirs[k] for k in ours_sd if k in theirs and ("lora_" in k or "modules_to_save" in k)}
    assert shared, "no adapter tensors in common"
    ours.load_state_dict(shared, strict=False)
    with torch.no_grad():  # make the head copies differ from the frozen originals
        for k, v in ours.named_parameters():
            if "modules_to_save" in k:
                v.add_(0.1)
        for k, v in peft_model.named_parameters():
            if "modules_to_save" in k:
                v.add_(0.1)
    return base, peft_model, ours


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_matches_peft(family):
    base, peft_model, ours = _peft_pair(family)
    inputs = sample_inputs(family)
    expected, got = logits(peft_model, inputs), logits(ours, inputs)
    assert (expected - logits(base, inputs)).abs().max() > 1e-3  # the adapter is not a no-op
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_slimtune_adapter_loads_in_peft(family, tmp_path):
    base, _, ours = _peft_pair(family)
    slimtune.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs(family)
    torch.testing.assert_close(logits(loaded, inputs), logits(ours, inputs), atol=TOL, rtol=0)
    # and the adapter really changes the output (so the comparison above means something)
    assert (logits(base, inputs) - logits(ours, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_adapter_loads_in_slimtune(family, tmp_path):
    base, peft_model, _ = _peft_pair(family)
    peft_model.save_pretrained(tmp_path)
    ours = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs(family)
    torch.testing.assert_close(logits(ours, inputs), logits(peft_model, inputs), atol=TOL, rtol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_round_trip_with_peft(bias, tmp_path):
    base, peft_model, ours = _peft_pair("gpt2", bias=bias)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.05)
    slimtune.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs("gpt2")
    torch.testing.assert_close(logits(loaded, inputs), logits(ours, inputs), atol=TOL, rtol=0)
    ours_names = {n for n, p in ours.named_parameters() if p.requires_grad}
    peft_names = {n.removeprefix("base_model.model.").replace(".default", "")
                  for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {n.replace(".default", "") for n in ours_names} == peft_names


@pytest.mark.parametrize("heads", [None, ["pooler"]], ids=["classifier", "pooler-and-classifier"])
def test_peft_sequence_classifier_with_bias_all_loads_as_in_peft(heads, tmp_path):
    """bias="all" makes PEFT save every parameter named like a bias, head copies' included: the frozen original's
    (``classifier.original_module.bias``), which PEFT loads back into it, and the copy's a second time
    (``classifier.modules_to_save.bias``, ``pooler.modules_to_save.default.dense.bias``), which it never loads."""
    base = tiny_bert_cls()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS", modules_to_save=heads,
        init_lora_weights=False)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.05)
    theirs.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.modules_to_save.bias", "base_model.model.classifier.original_module.bias",
            "base_model.model.classifier.bias"} <= keys
    fresh = copy.deepcopy(base)
    with torch.no_grad():  # PEFT puts the file's original_module.bias back into the frozen original
        fresh.classifier.bias.add_(1.0)
    ours = slimtune.load_adapter(copy.deepcopy(fresh), tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path).eval()
    inputs = sample_inputs("bert")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)
    with slimtune.disable_adapters(ours), back.disable_adapter():
        torch.testing.assert_close(logits(ours, inputs), logits(back, inputs), atol=TOL, rtol=0)


def test_embedding_lora_matches_peft(tmp_path):
    base = FAMILIES["llama"][0]()
    targets = ["embed_tokens", "q_proj"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets,
                                                                       init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)


def test_modules_to_save_picks_the_modules_peft_picks_and_its_files_load(tmp_path):
    """PEFT's rule is a plain suffix: ``norm`` copies ``model.norm`` and every ``*_layernorm``."""
    base = FAMILIES["llama"][0]()
    config = dict(r=4, target_modules=["q_proj"], modules_to_save=["norm"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(**config))
    copies = {n.removeprefix("base_model.model.") for n, _ in theirs.named_modules() if n.endswith("modules_to_save")}
    assert {n for n, _ in ours.named_modules() if n.endswith("modules_to_save")} == copies
    assert any("input_layernorm" in n for n in copies) and any(n.startswith("model.norm") for n in copies)
    assert slimtune.trainable_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    for _, module in theirs.named_modules():  # trained copies that differ from the originals
        if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
            torch.nn.init.normal_(module.modules_to_save["default"].weight)
    theirs.save_pretrained(tmp_path)
    loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(theirs, inputs), atol=TOL, rtol=0)


def test_lora_on_a_scaled_embedding_matches_peft_and_its_own_merge(tmp_path):
    """Gemma's embedding multiplies the rows it looks up by √hidden: the LoRA update is scaled the same way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma2", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  tie_word_embeddings=False)  # (merging a tied table changes the head too)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    # transformers 5 scales in the embedding module (embed_scale); 4.x scaled the model's input embeddings after it
    assert float(getattr(base.model.embed_tokens, "embed_scale", base.model.config.hidden_size ** 0.5)) != 1.0
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                                       init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = {"input_ids": torch.randint(0, 128, (2, 7))}
    assert (logits(theirs, inputs) - logits(base, inputs)).abs().max() > 0.1  # the update shows
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)
    merged = slimtune.merge_and_unload(copy.deepcopy(ours))
    torch.testing.assert_close(logits(merged, inputs), logits(ours, inputs), atol=TOL, rtol=0)


def test_rslora_and_patterns_match_peft(tmp_path):
    base = FAMILIES["llama"][0]()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                  rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path)
    ours = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)
    assert ours.model.layers[0].self_attn.v_proj.lora_A["default"].weight.shape == (2, 32)


def test_overlapping_pattern_keys_keep_their_order_in_the_file(tmp_path):
    """The first key of rank_pattern / alpha_pattern that matches a layer wins, in PEFT and slimtune alike: the
    file keeps the keys in the config's order (sorted, layer 1's q_proj would get alpha 2 and layer 0's v_proj rank
    6), so both read back the ranks and scalings the adapter has."""
    base = FAMILIES["llama"][0]()
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                  alpha_pattern={"q_proj": 16, "layers.1.self_attn.q_proj": 2},
                  rank_pattern={"v_proj": 2, "layers.0.self_attn.v_proj": 6})
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kwargs))).eval()
    ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(**kwargs))
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()
                          if "lora_" in k}, strict=False)
    inputs = sample_inputs("llama")
    expected = logits(theirs, inputs)
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)
    slimtune.save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(saved) == sorted(saved)  # the fields themselves stay sorted, as PEFT writes them
    assert list(saved["alpha_pattern"]) == ["q_proj", "layers.1.self_attn.q_proj"]
    assert list(saved["rank_pattern"]) == ["v_proj", "layers.0.self_attn.v_proj"]
    for loaded in (slimtune.load_adapter(copy.deepcopy(base), tmp_path),
                   peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()):
        torch.testing.assert_close(logits(loaded, inputs), expected, atol=TOL, rtol=0)


def _tiny_moe():
    """A 2-layer mixture-of-experts decoder (Qwen3-MoE): under transformers 5 its experts are fused 3-D
    parameters, which PEFT's own "all-linear" targets and slimtune's does not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=32, intermediate_size=64, head_dim=8,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_all_linear_is_saved_as_the_modules_it_wrapped(tmp_path):
    """PEFT writes "all-linear" out as module names; so does slimtune, so that PEFT loads exactly the wrapped
    layers: a last name component where it is unambiguous, the full name where it would pick more."""
    base = _tiny_moe()
    config = slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1,
                                 init_lora_weights=False)
    ours = slimtune.add_adapter(copy.deepcopy(base), config)
    wrapped = {name for name, m in ours.named_modules() if hasattr(m, "lora_A")}
    slimtune.save_adapter(ours, tmp_path / "moe")
    saved = json.loads((tmp_path / "moe" / "adapter_config.json").read_text())["target_modules"]
    assert saved == sorted({name.rpartition(".")[2] for name in wrapped})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "moe").eval()
    assert {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")} == wrapped
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    ours.eval()
    torch.testing.assert_close(logits(ours, {"input_ids": ids}), logits(theirs, {"input_ids": ids}),
                               atol=TOL, rtol=0)

    first_layer = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(
        r=4, target_modules="all-linear", layers_to_transform=[0]))
    slimtune.save_adapter(first_layer, tmp_path / "first")
    saved = json.loads((tmp_path / "first" / "adapter_config.json").read_text())["target_modules"]
    wrapped = sorted(name for name, m in first_layer.named_modules() if hasattr(m, "lora_A"))
    assert wrapped and all(name.startswith("model.layers.0.") for name in wrapped)
    assert saved == wrapped  # layer 1 has modules of the same last names: full names pick layer 0's alone


@pytest.mark.parametrize("builder", [tiny_llama_cls, tiny_bert_cls], ids=["llama-score", "bert-classifier"])
@pytest.mark.parametrize("method", ["LORA", "LOHA", "VERA"])
def test_sequence_classification_trains_a_head_copy_by_default_as_peft(builder, method, tmp_path):
    """task_type SEQ_CLS without modules_to_save: PEFT trains (and saves) a copy of the new, random classification
    head ("classifier" or "score"); so does slimtune, for every method, and the files move both ways."""
    options = {"LORA": dict(r=4, target_modules="all-linear", init_lora_weights=False),
               "LOHA": dict(r=4, target_modules="all-linear", init_weights=False),
               "VERA": dict(r=4, target_modules="all-linear")}[method]
    base = builder()
    ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.config_from_dict(
        {"peft_type": method, "task_type": "SEQ_CLS", **options}))
    heads = [n for n, p in ours.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert heads and all(n.split(".")[0] in ("score", "classifier") for n in heads)
    with torch.no_grad():  # the head copy moves away from the original, so the files must carry it
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1)
    inputs = sample_inputs("bert" if builder is tiny_bert_cls else "llama")
    slimtune.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    ours.eval()
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(back, inputs), logits(ours, inputs), atol=TOL, rtol=0)


def test_sequence_classification_with_a_head_named_otherwise_trains_no_copy_as_peft(tmp_path):
    """BART's head is ``classification_head``: the SEQ_CLS default names (classifier, score) match nothing, which PEFT
    accepts (no head copy, same trainable count and files); slimtune too, with a warning naming the head. A
    modules_to_save the user gives must still match."""
    base = tiny_bart_cls()
    options = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **options)).eval()
    with pytest.warns(UserWarning, match=r"task_type='SEQ_CLS' trains a copy of the head named classifier or score, "
                                         r"but this model has no such module.*\['classification_head'\]"):
        ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(**options))
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.warns(UserWarning, match="no such module"):
        back = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    inputs = sample_inputs("bart")
    inputs["input_ids"][:, -1] = 2  # BART classifies at the end-of-sequence token
    torch.testing.assert_close(logits(back, inputs), logits(theirs, inputs), atol=TOL, rtol=0)
    slimtune.save_adapter(back, tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"modules_to_save=\['cls_head', 'classifier', 'score'\] matched no module; "
                                         r"top-level modules are: \['model', 'classification_head'\]"):
        slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(modules_to_save=["cls_head"], **options))
    # PEFT adds its head names to those given, [] included: the file's config says so too
    for given in ([], ["classification_head"]):
        config = slimtune.LoraConfig(modules_to_save=given, **options)
        assert config.modules_to_save == [*given, "classifier", "score"]
        ref = peft.LoraConfig(modules_to_save=list(given), **options)
        peft.get_peft_model(copy.deepcopy(base), ref)
        assert ref.modules_to_save == config.modules_to_save


def test_orthogonal_init_starts_at_the_base_and_peft_files_with_other_inits_load(tmp_path):
    base = FAMILIES["llama"][0]()
    inputs = sample_inputs("llama")
    ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                         init_lora_weights="orthogonal"))
    layer = ours.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.abs().min() > 0 and B.abs().max() > 0.01 and (B @ A).abs().max() < 1e-6  # both random, B A = 0
    torch.testing.assert_close(logits(ours, inputs), logits(base, inputs), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"init_lora_weights='orthogonal' needs an even rank; this layer's is r=3"):
        slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=3, target_modules=["q_proj"],
                                                                      init_lora_weights="orthogonal"))
    for init in ("orthogonal", "eva", "mica", "MiCA"):  # inits that leave the base as it is: plain LoRA when saved
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                           init_lora_weights="orthogonal"))
        with torch.no_grad():
            theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(0.5)
        theirs.save_pretrained(tmp_path / init)
        saved = json.loads((tmp_path / init / "adapter_config.json").read_text())
        (tmp_path / init / "adapter_config.json").write_text(json.dumps({**saved, "init_lora_weights": init}))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path / init)
        torch.testing.assert_close(logits(loaded, inputs), logits(theirs, inputs), atol=TOL, rtol=0)
        said = [str(w.message) for w in seen if "init_lora_weights" in str(w.message)]
        assert len(said) == (init.lower() == "mica") and all("trains only lora_A" in text for text in said), said


@pytest.mark.parametrize("key, value", [("lora_bias", True), ("trainable_token_indices", [5, 6]),
                                        ("layer_replication", [[0, 1], [0, 1]]), ("use_qalora", True)])
def test_peft_options_that_change_the_adapter_are_refused_by_name(key, value, tmp_path):
    base = FAMILIES["llama"][0]()
    slimtune.save_adapter(slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(target_modules=["q_proj"])),
                          tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, key: value}))
    with pytest.raises(ValueError, match=rf"{key}=.*: PEFT's {key} changes the adapter's weights or forward"):
        slimtune.load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("variant", ["velora", "monteclora"])
def test_lora_variants_that_change_only_training_load_as_plain_lora(variant, tmp_path):
    """VeLoRA (compressed activations) and MonteCLoRA (noise sampled around A) change only how PEFT trains: their
    files hold the extra state too, and a frozen load computes PEFT's inference outputs, with a warning."""
    from peft.tuners.lora.config import MontecloraConfig, VeloraConfig

    base = FAMILIES["llama"][0]()
    extra = {"velora_config": VeloraConfig(num_groups=4)} if variant == "velora" else \
        {"monteclora_config": MontecloraConfig()}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       **extra))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    theirs.train()
    theirs(**sample_inputs("llama"), labels=sample_inputs("llama")["input_ids"]).loss.backward()  # (its state)
    theirs.save_pretrained(tmp_path)
    inputs = sample_inputs("llama")
    with pytest.warns(UserWarning, match=f"{variant}_config"):
        ours = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs.eval(), inputs), atol=TOL, rtol=0)
    with pytest.warns(UserWarning, match=f"{variant}_config"):  # the other readers of such a file: plain LoRA too
        slimtune.combine_adapter_files([tmp_path, tmp_path], [1.0, 1.0], tmp_path / "combined")
        write_gguf_lora(tmp_path, base.config, tmp_path / "adapter.gguf")


def test_settings_of_an_initialisation_or_a_runtime_load_without_a_word(tmp_path):
    """PEFT's eva_config / corda_config / runtime_config only say how an adapter was started or where PEFT runs it:
    the file's weights are the adapter. An init that changed the base is refused, saying how PEFT converts it."""
    base = FAMILIES["llama"][0]()
    slimtune.save_adapter(slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(target_modules=["q_proj"])),
                          tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    settings = {"eva_config": {"rho": 2.0}, "corda_config": {"cache_file": "x"},
                "runtime_config": {"ephemeral_gpu_offload": True}}
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, **settings}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(ValueError, match="pissa_niter_4.*save it from PEFT with path_initial_model_for_weight_conv"):
        slimtune.load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("kwargs", [dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                                    dict(target_modules=["lm_head", "q_proj"]),
                                    dict(target_modules=["embed_tokens", "q_proj"])],
                         ids=["head-copy", "lm_head", "embed_tokens"])
def test_peft_files_with_ensure_weight_tying_are_refused_where_it_ties(kwargs, tmp_path):
    """PEFT's ensure_weight_tying=True ties an adapter's embedding and output-layer parts into one (a file then holds
    weights only that tying explains): refused by name, with what to do. Where it ties nothing, PEFT ignores it, and
    so does slimtune, silently."""
    base = tiny_llama(tie_word_embeddings=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, ensure_weight_tying=True,
                                                                       init_lora_weights=False, **kwargs))
    theirs.save_pretrained(tmp_path / "tied")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"adapter_config.json: ensure_weight_tying=True: .* slimtune does not "
                                         r"implement\. Load this adapter with PEFT"):
        slimtune.load_adapter(model, tmp_path / "tied")
    assert not hasattr(model, "slimtune_state")
    untouched = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, ensure_weight_tying=True,
                                                                          init_lora_weights=False,
                                                                          target_modules=["q_proj"])).eval()
    untouched.save_pretrained(tmp_path / "q_proj")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "q_proj")
    assert not [w for w in caught if "ensure_weight_tying" in str(w.message)]
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(untouched, inputs), atol=TOL, rtol=0)
