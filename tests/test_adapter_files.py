"""Adapter files: PEFT key names, atomic writes, and bad input that leaves the model untouched."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import logits, sample_inputs, tiny_llama

import slimtune
from slimtune.adapter_files import adapter_tensors
from slimtune.core.state import get_state
from slimtune.errors import InvalidFileError


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, snapshot):
    types, weights, grads = snapshot
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not hasattr(model, "slimtune_state")


def _saved_adapter(tmp_path, **kwargs):
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs))
    return slimtune.save_adapter(model, tmp_path / "adapter"), model


def test_files_use_peft_keys_and_config(tmp_path):
    folder, _ = _saved_adapter(tmp_path)
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys and len(keys) == 8
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["inference_mode"] is True
    assert list(config) == sorted(config)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_keys_without_prefix_load(tmp_path):
    folder, model = _saved_adapter(tmp_path, init_lora_weights=False)
    path = folder / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k.removeprefix("base_model.model."): f.get_tensor(k) for k in f.keys()}
    from safetensors.torch import save_file
    save_file(tensors, path)
    loaded = slimtune.load_adapter(tiny_llama(), folder)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-6, rtol=0)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    folder, _ = _saved_adapter(tmp_path)
    assert not any(p.requires_grad for p in slimtune.load_adapter(tiny_llama(), folder).parameters())
    trainable = slimtune.load_adapter(tiny_llama(), folder, is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 8


def test_target_that_matches_nothing_leaves_model_unchanged():
    model = tiny_llama()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["attention"]))
    _assert_unchanged(model, snapshot)


def test_shapes_that_do_not_fit_leave_model_unchanged(tmp_path):
    folder, _ = _saved_adapter(tmp_path)
    bigger = tiny_llama()
    bigger_cfg = bigger.config
    bigger_cfg.hidden_size = 64
    from transformers import LlamaForCausalLM
    other = LlamaForCausalLM(bigger_cfg)
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match=r"has shape \(4, 32\) but the model expects \(4, 64\)"):
        slimtune.load_adapter(other, folder)
    _assert_unchanged(other, snapshot)


def test_missing_and_corrupt_files(tmp_path):
    model = tiny_llama()
    snapshot = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        slimtune.load_adapter(model, tmp_path / "nowhere")
    folder, _ = _saved_adapter(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        slimtune.load_adapter(model, folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        slimtune.load_adapter(model, folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        slimtune.load_adapter(model, folder)
    for number in ("NaN", "Infinity"):  # Python's json writes and reads these; PEFT's configs never hold them
        (folder / "adapter_config.json").write_text(f'{{"peft_type": "LORA", "r": 4, "lora_alpha": {number}}}')
        with pytest.raises(ValueError, match=rf"lora_alpha={number.lower()[:3]}.* is not of the field's type"):
            slimtune.load_adapter(model, folder)
    _assert_unchanged(model, snapshot)


def test_pickle_adapter_is_refused_with_the_reason(tmp_path):
    folder, model = _saved_adapter(tmp_path, init_lora_weights=False)
    path = folder / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    torch.save(tensors, folder / "adapter_model.bin")
    path.unlink()
    fresh = tiny_llama()
    snapshot = _snapshot(fresh)
    with pytest.raises(ValueError, match="pickle.*arbitrary code.*allow_pickle=True"):
        slimtune.load_adapter(fresh, folder)
    _assert_unchanged(fresh, snapshot)
    loaded = slimtune.load_adapter(fresh, folder, allow_pickle=True)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-6, rtol=0)


def test_adapter_with_missing_tensor_is_rejected(tmp_path):
    folder, _ = _saved_adapter(tmp_path)
    path = folder / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if "layers.1.self_attn.v_proj.lora_B" not in k}
    from safetensors.torch import save_file
    save_file(tensors, path)
    model = tiny_llama()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="missing from the file"):
        slimtune.load_adapter(model, folder)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_an_adapter_holding_inf_or_nan_is_refused_naming_the_tensor(tmp_path, bad):
    folder, _ = _saved_adapter(tmp_path)
    path = folder / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key].view(-1)[3] = bad
    from safetensors.torch import save_file
    save_file(tensors, path)
    model = tiny_llama()
    snapshot = _snapshot(model)
    with pytest.raises(InvalidFileError, match=rf"adapter_model.safetensors: '{key}' holds 1 inf/NaN values "
                                                        r"of \d+: the file is damaged"):
        slimtune.load_adapter(model, folder)
    _assert_unchanged(model, snapshot)


def test_unwritable_folder_is_a_clear_error(tmp_path):
    _, model = _saved_adapter(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot create adapter folder"):
        slimtune.save_adapter(model, blocker / "adapter")


def test_adding_the_same_adapter_name_twice_is_refused():
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["v_proj"]))


def test_trainable_parameter_report(tmp_path):
    folder, model = _saved_adapter(tmp_path)
    report = slimtune.trainable_parameters(model)
    # q: A (4x32) + B (32x4); v: A (4x32) + B (16x4); two layers
    assert report.trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    assert report.total == base_total + report.trainable
    assert report.adapter_bytes == (folder / "adapter_model.safetensors").stat().st_size
    assert f"{report.percent:.4f}%" in str(report)


def test_an_adapterhub_folder_points_to_load_adapterhub():
    folder = Path(__file__).parent / "fixtures" / "adapterhub" / "llama" / "seq_bn"
    with pytest.raises(ValueError, match=r"AdapterHub .* slimtune.load_adapterhub\(model"):
        slimtune.load_adapter(tiny_llama(), folder)


def _peft_folders(tmp_path, **kwargs):
    """Adapters "a" and "b" of random weights saved by PEFT (in tmp_path/a and tmp_path/b), and PEFT's model
    holding both loaded, as PeftModel.from_pretrained + load_adapter leave it."""
    import peft  # the oracle
    config = lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs)  # noqa: E731
    saved = peft.get_peft_model(tiny_llama(), config(), adapter_name="a")
    saved.add_adapter("b", config())
    saved.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama().train(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    return theirs


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_a_later_load_waits_and_frozen_loads_stay_frozen_as_in_peft(tmp_path):
    """The model's first adapter becomes active, later ones wait (PEFT keeps the active adapter); frozen loads
    leave nothing trainable, the first adapter included (activating must not unfreeze it)."""
    theirs = _peft_folders(tmp_path, modules_to_save=["lm_head"])
    ours = tiny_llama()
    slimtune.load_adapter(ours, tmp_path / "a", "a")
    slimtune.load_adapter(ours, tmp_path / "b", "b")
    assert ours.slimtune_state.active == ["a"] == theirs.active_adapters
    assert _trainable(ours) == _trainable(theirs) == []
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)
    for activate, trainable in ((False, True), (None, False)):  # frozen or not, an inactive adapter does not train
        slimtune.load_adapter(ours, tmp_path / "b", f"b{activate}", is_trainable=trainable, activate=activate)
        assert ours.slimtune_state.active == ["a"] and _trainable(ours) == []
    slimtune.load_adapter(ours, tmp_path / "b", "c", is_trainable=True, activate=True)  # asked: active, trains
    assert ours.slimtune_state.active == ["c"]
    assert _trainable(ours) and all(".c." in n or n.endswith(".c.weight") for n in _trainable(ours))
    theirs.set_adapter("b")
    slimtune.set_adapter(ours, "b")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)


def test_a_frozen_load_puts_the_model_in_eval_mode_as_peft(tmp_path):
    """An inference load runs no dropout even into a model in train() mode (PEFT calls model.eval()); a
    trainable load keeps the model's mode."""
    theirs = _peft_folders(tmp_path, lora_dropout=0.5)
    ours = slimtune.load_adapter(tiny_llama().train(), tmp_path / "a", "a")
    assert not theirs.training and not any(m.training for m in ours.modules())
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(ours, inputs), logits(ours, inputs), atol=0, rtol=0)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)
    trained = slimtune.load_adapter(tiny_llama().train(), tmp_path / "a", "a", is_trainable=True)
    assert all(m.training for m in trained.modules())


@pytest.mark.parametrize("activate", [None, True])
def test_a_failed_load_beside_other_adapters_keeps_which_are_active_and_frozen(tmp_path, activate):
    from safetensors.torch import load_file, save_file

    folder, _ = _saved_adapter(tmp_path, init_lora_weights=False)
    bad = slimtune.save_adapter(slimtune.add_adapter(tiny_llama(seed=5), slimtune.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)), tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors[sorted(tensors)[-1]][-1, -1] = float("nan")  # the last tensor: everything before it was copied in
    save_file(tensors, bad / "adapter_model.safetensors")
    model = slimtune.load_adapter(tiny_llama(), folder, "a")  # frozen, for inference
    slimtune.load_adapter(model, folder, "c", is_trainable=True)
    slimtune.set_adapter(model, ["a", "c"])
    inputs = sample_inputs("llama")
    before, grads = logits(model, inputs), {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(grads.values()) and not all(grads.values())
    rng = torch.random.get_rng_state()
    with pytest.raises(InvalidFileError, match="NaN|inf|finite"):
        slimtune.load_adapter(model, bad, "b", activate=activate)
    assert torch.equal(torch.random.get_rng_state(), rng)  # (the new layers' initial draws are taken back)
    assert get_state(model).active == ["a", "c"] and "b" not in get_state(model).configs
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)
    alone = slimtune.load_adapter(tiny_llama(), folder, "a")  # an inference load: nothing trains
    with pytest.raises(InvalidFileError):
        slimtune.load_adapter(alone, bad, "b", activate=activate)
    assert not any(p.requires_grad for p in alone.parameters()) and get_state(alone).active == ["a"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_file_in_a_narrower_float_dtype_loads_cast_and_its_nan_is_named(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    folder, _ = _saved_adapter(tmp_path, init_lora_weights=False)
    weights = folder / "adapter_model.safetensors"
    narrow = {k: v.to(dtype) for k, v in load_file(weights).items()}
    save_file(narrow, weights)
    model = slimtune.load_adapter(tiny_llama(), folder)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.testing.assert_close(model.get_parameter(key.replace("base_model.model.", "").replace(
        "lora_A.weight", "lora_A.default.weight")), narrow[key].float(), atol=0, rtol=0)
    narrow[key] = narrow[key].float().index_fill(1, torch.tensor([0]), float("nan")).to(dtype)
    save_file(narrow, weights)
    with pytest.raises(InvalidFileError, match=rf"'{key}' holds 4 inf/NaN values"):
        slimtune.load_adapter(tiny_llama(), folder)


def _resized(build):
    """``build()`` with 3 tokens added to its vocabulary (random rows), in eval mode."""
    model = build()
    model.resize_token_embeddings(model.config.vocab_size + 3, mean_resizing=False)
    return model.eval()


def _peft_resized_adapter(folder, build, config):
    """A PEFT adapter trained on ``_resized(build)`` (nonzero weights, trained rows for the added tokens), saved with
    the embedding tables as PEFT >= 0.7 saves them; its model and inputs reaching an added token."""
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(_resized(build), config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        table = peft_model.get_input_embeddings().weight
        table[-3:] = torch.randn(3, table.shape[1])
    peft_model.save_pretrained(folder, save_embedding_layers=True)  # ("auto" compares with the Hub's config)
    return peft_model.eval(), {"input_ids": torch.tensor([[5, 6, peft_model.config.vocab_size - 1]])}


@pytest.mark.parametrize("heads", [False, True], ids=["lora only", "head copies"])
def test_an_adapter_for_a_resized_vocabulary_loads_its_embeddings_as_peft_does(tmp_path, heads):
    # Unsloth / LLaMA-Factory with added tokens: PEFT >= 0.7 stores the resized embed_tokens / lm_head whole
    from peft import LoraConfig as PeftLoraConfig

    peft_model, inputs = _peft_resized_adapter(tmp_path, tiny_llama, PeftLoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"] if heads else None))
    loaded = slimtune.load_adapter(_resized(tiny_llama), tmp_path)
    torch.testing.assert_close(loaded(**inputs).logits, peft_model(**inputs).logits, atol=1e-6, rtol=0)
    with pytest.raises(InvalidFileError, match=r"trained with a vocabulary of \d+ tokens: resize the base first"):
        slimtune.load_adapter(tiny_llama(), tmp_path)  # not resized


@pytest.mark.parametrize("heads", [False, True], ids=["lora only", "head copies"])
def test_an_adapter_on_a_resized_vocabulary_saves_the_tables_as_peft_does(tmp_path, heads):
    """Tokens added to a base loaded from a folder: the adapter file holds the resized tables (PEFT's "auto"
    save_embedding_layers), and loads into a base resized again (other rows for the added tokens) to the same
    model; an adapter on the base as saved holds no tables."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    def base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    heads_to_save = {"modules_to_save": ["lm_head"]} if heads else {}
    plain = slimtune.add_adapter(base(), slimtune.LoraConfig(r=2, target_modules=["q_proj"], **heads_to_save))
    slimtune.save_adapter(plain, tmp_path / "plain")
    assert set(load_file(tmp_path / "plain" / "adapter_model.safetensors")) == set(adapter_tensors(plain))
    torch.manual_seed(0)
    model = slimtune.add_adapter(_resized(base), slimtune.LoraConfig(r=2, target_modules=["q_proj"],
                                                                     init_lora_weights=False, **heads_to_save))
    with torch.no_grad():
        model.get_input_embeddings().weight[-3:] = torch.randn(3, model.config.hidden_size)  # the added tokens
    slimtune.save_adapter(model, tmp_path / "ours")
    theirs = get_peft_model(_resized(base), PeftLoraConfig(r=2, target_modules=["q_proj"], **heads_to_save))
    theirs.save_pretrained(tmp_path / "theirs")  # "auto": it compares with the folder's config.json
    saved = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert saved > set(adapter_tensors(model))
    assert saved == {k for k in load_file(tmp_path / "theirs" / "adapter_model.safetensors")
                     if ".modules_to_save." not in k}  # (PEFT writes a head copy a second time)
    inputs = {"input_ids": torch.tensor([[5, 6, model.config.vocab_size - 1]])}
    loaded = slimtune.load_adapter(_resized(base), tmp_path / "ours")
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)


def test_key_spellings_peft_reads_are_read(tmp_path):
    from safetensors.torch import load_file, save_file

    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True,
                                                                   init_lora_weights=False))
    slimtune.save_adapter(model, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    respelled = {k.replace("lora_A.weight", "lora_A.default.weight").replace(
        "lora_magnitude_vector", "lora_magnitude_vector.weight"): v for k, v in load_file(file).items()}
    assert respelled.keys() != load_file(file).keys()
    save_file(respelled, file)  # a dumped PeftModel state dict; DoRA's magnitude as PEFT also accepts it
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(slimtune.load_adapter(tiny_llama(), tmp_path), inputs), logits(model, inputs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_resized_gpt2_and_a_table_stored_in_16_bits_load(tmp_path, dtype):
    # PEFT stores the model's own embedding tables whatever their name (GPT-2's wte), as the training base had them
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import load_file, save_file
    from tiny_models import tiny_gpt2

    peft_model, inputs = _peft_resized_adapter(tmp_path, tiny_gpt2, PeftLoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    file = tmp_path / "adapter_model.safetensors"
    save_file({k: v.to(dtype) if "wte" in k or "lm_head" in k else v for k, v in load_file(file).items()},
              file)  # a 16-bit training base: every row rounded (fp16's small values to its subnormal steps)
    loaded = slimtune.load_adapter(_resized(tiny_gpt2), tmp_path)
    torch.testing.assert_close(loaded(**inputs).logits, peft_model(**inputs).logits, atol=0.05, rtol=0)


def test_a_transformers_4_per_expert_adapter_is_refused_saying_why(tmp_path):
    from safetensors.torch import load_file, save_file

    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    slimtune.save_adapter(model, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight"
    save_file({**load_file(file), key: torch.zeros(2, 32)}, file)
    with pytest.raises(InvalidFileError, match="as transformers 4 laid mixtures of experts out.*load it with PEFT"):
        slimtune.load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("method", ["LoraConfig", "IA3Config", "VeraConfig"])
def test_the_saved_layout_flag_is_the_layers_as_peft_writes_it(tmp_path, method):
    """GPT-2's Conv1D layers store (in, out): the saved config says fan_in_fan_out true whatever the config said (it
    said false; PEFT corrects its config and saves true), and false for nn.Linear layers."""
    import peft
    from tiny_models import tiny_gpt2

    for build, targets in ((tiny_gpt2, ["c_attn", "c_fc"]), (tiny_llama, ["q_proj", "v_proj"])):
        conv1d = build is tiny_gpt2
        options = {"IA3Config": {"feedforward_modules": targets[1:]}, "VeraConfig": {"r": 4}}.get(method, {"r": 2})
        ours = getattr(slimtune, method)(target_modules=targets, fan_in_fan_out=not conv1d, **options)
        theirs = getattr(peft, method)(target_modules=targets, fan_in_fan_out=not conv1d, **options)
        with pytest.warns(UserWarning, match=f"fan_in_fan_out={not conv1d} does not match"):
            slimtune.save_adapter(slimtune.add_adapter(build(), ours), tmp_path / "ours")
        peft.get_peft_model(build(), theirs).save_pretrained(tmp_path / "theirs")
        saved = [json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs")]
        assert saved[0]["fan_in_fan_out"] is saved[1]["fan_in_fan_out"] is conv1d
        assert ours.fan_in_fan_out is not conv1d  # the user's config is left as it was


def test_load_adapter_takes_a_config_as_peft_takes_one(tmp_path):
    """config= replaces the folder's config: slimtune's, PEFT's (as PeftModel.from_pretrained takes it), or a dict
    of its fields; the file's tensors load as saved."""
    from peft import LoraConfig as PeftLoraConfig

    folder, saved = _saved_adapter(tmp_path, init_lora_weights=False)
    stored = json.loads((folder / "adapter_config.json").read_text())
    inputs = sample_inputs("llama")
    for given in (slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.25),
                  PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.25),
                  {**stored, "lora_dropout": 0.25}):
        model = slimtune.load_adapter(tiny_llama(), folder, config=given)
        assert get_state(model).configs["default"].lora_dropout == 0.25, type(given)
        torch.testing.assert_close(logits(model, inputs), logits(saved, inputs), atol=0, rtol=0)
    with pytest.raises(TypeError, match="config must be a slimtune method config .* got int"):
        slimtune.load_adapter(tiny_llama(), folder, config=4)
    with pytest.raises(InvalidFileError, match=r"config=: peft_type='NOPE' is not a method slimtune knows"):
        slimtune.load_adapter(tiny_llama(), folder, config={**stored, "peft_type": "NOPE"})


@pytest.mark.parametrize("method", ["p_tuning", "prefix_projection"])
def test_a_given_config_loads_a_folded_encoder_as_peft_does(tmp_path, method):
    """A P-tuning (or projected prefix) file holds its encoder's outputs: a frozen load with config= (PEFT's or a
    dict) builds the table they fill, as PeftModel.from_pretrained(config=) does, whatever inference_mode says;
    a config's init-only fields (a tokenizer to download) are not followed."""
    import peft

    def config():
        if method == "p_tuning":
            return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                       encoder_hidden_size=16)

    torch.manual_seed(0)
    trained = peft.get_peft_model(tiny_llama(), config())
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    trained.save_pretrained(tmp_path)
    inputs = sample_inputs("llama")
    expected = logits(trained.eval(), inputs)
    for given in (config(), config().to_dict()):
        torch.testing.assert_close(logits(slimtune.load_adapter(tiny_llama(), tmp_path, config=given), inputs),
                                   expected)
    saved = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft.get_peft_model(tiny_llama(), saved).save_pretrained(tmp_path / "prompt")
    text_init = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                        prompt_tuning_init_text="hi", tokenizer_name_or_path="no-such/tokenizer")
    loaded = slimtune.load_adapter(tiny_llama(), tmp_path / "prompt", config=text_init)  # (no download tried)
    assert get_state(loaded).configs["default"].prompt_tuning_init == "RANDOM"
