"""AdapterHub's folders in slimtune: pickle only on request, the two adapter_config.json formats told apart by
content, what slimtune does not implement refused by name, mismatches leave the model as it was, ``init_from``
(recipes start from a saved adapter), and slimtune's own format for AdapterHub-placed adapters."""

import copy
import json
import shutil

import pytest
import torch
from hub_cases import FIXTURES, captured, captured_base
from safetensors.torch import load_file, save_file
from tiny_models import logits, one_thread, sample_inputs, tiny_t5  # noqa: F401 (a fixture, used by pytestmark)
from transformers import BertModel

import slimtune
from slimtune import adapterhub
from slimtune.core.state import find_state
from slimtune.errors import InvalidFileError

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy(tmp_path, family, case):
    return shutil.copytree(FIXTURES / family / case, tmp_path / case)


def _inputs(family):
    return {k.removeprefix("input."): v for k, v in captured(family).items() if k.startswith("input.")}


def test_pickle_files_need_the_opt_in_and_load_with_weights_only(tmp_path):
    folder = _copy(tmp_path, "llama", "double_seq_bn")
    torch.save(load_file(folder / "adapter.safetensors"), folder / "pytorch_adapter.bin")
    (folder / "adapter.safetensors").unlink()
    model = captured_base("llama")
    with pytest.raises(ValueError, match=r"pytorch_adapter.bin.*allow_pickle=True"):
        adapterhub.load_adapterhub(model, folder)
    assert find_state(model) is None
    adapterhub.load_adapterhub(model, folder, allow_pickle=True)
    torch.testing.assert_close(logits(model, _inputs("llama")), captured("llama")["double_seq_bn.logits"],
                               atol=1e-5, rtol=0)


def test_weights_holding_nan_are_refused_and_the_model_left_as_it_was(tmp_path):
    folder = _copy(tmp_path, "llama", "seq_bn")
    weights = load_file(folder / "adapter.safetensors")
    key = sorted(weights)[0]
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, folder / "adapter.safetensors")
    model = captured_base("llama")
    with pytest.raises(InvalidFileError, match=rf"'{key}' holds 1 inf/NaN values"):
        adapterhub.load_adapterhub(model, folder)
    assert find_state(model) is None
    for name in ("a", "c"):  # beside other adapters: which are active, and what trains, stay as they were
        slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), name)
    slimtune.set_adapter(model, ["a", "c"])
    for param in model.parameters():
        param.requires_grad_(False)  # e.g. loaded for inference
    before = logits(model, _inputs("llama"))
    with pytest.raises(InvalidFileError):
        adapterhub.load_adapterhub(model, folder, "b")
    assert find_state(model).active == ["a", "c"] and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model, _inputs("llama")), before, atol=0, rtol=0)


def test_the_two_adapter_config_formats_are_told_apart_by_content(tmp_path):
    lora = slimtune.add_adapter(captured_base("llama"), slimtune.LoraConfig(target_modules=["q_proj"]))
    slimtune.save_adapter(lora, tmp_path / "peft")
    assert adapterhub.folder_kind(tmp_path / "peft") == "peft"
    assert adapterhub.folder_kind(FIXTURES / "llama" / "seq_bn") == "adapterhub"
    assert adapterhub.folder_kind(FIXTURES / "llama" / "fusion") == "adapterhub_fusion"
    with pytest.raises(ValueError, match=r"PEFT/slimtune adapter \(peft_type='LORA'\).*slimtune.load_adapter"):
        adapterhub.load_adapterhub(captured_base("llama"), tmp_path / "peft")
    with pytest.raises(ValueError, match="holds a LORA adapter, not a bottleneck adapter"):
        slimtune.BottleneckConfig(init_from=str(tmp_path / "peft"))


@pytest.mark.parametrize("key, value, message", [
    ("phm_layer", True, "phm_layer=True .Compacter"),
    ("inv_adapter", "nice", "inv_adapter='nice' .invertible"),
    ("cross_adapter", True, "cross_adapter=True"),
    ("stochastic_depth", 0.1, "stochastic_depth=0.1"),
    ("architecture", "lora", "an AdapterHub 'lora' adapter"),
    ("non_linearity", "mish", "non_linearity='mish'"),
    ("scaling", "sometimes", "scaling='sometimes'"),
])
def test_what_slimtune_does_not_implement_is_refused_by_name(tmp_path, key, value, message):
    folder = _copy(tmp_path, "gpt2", "seq_bn")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["config"][key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = captured_base("gpt2")
    with pytest.raises(ValueError, match=message):
        adapterhub.load_adapterhub(model, folder)
    assert find_state(model) is None


def test_mismatches_name_the_problem_and_leave_the_model_as_it_was(tmp_path):
    model = captured_base("llama")
    with pytest.raises(ValueError, match="belong to no adapter module"):
        adapterhub.load_adapterhub(model, FIXTURES / "gpt2" / "seq_bn")  # another architecture's keys
    folder = _copy(tmp_path, "llama", "seq_bn")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError, match="hidden size 64, this model has 32"):
        adapterhub.load_adapterhub(model, folder)
    assert find_state(model) is None
    with pytest.raises(ValueError, match="needs its fused adapters|is not on the model"):
        adapterhub.load_adapterhub(model, FIXTURES / "llama" / "fusion")
    assert find_state(model) is None


def test_a_folder_saved_with_a_head_loads_into_the_bare_encoder():
    """Keys saved from BertForSequenceClassification (``bert.encoder…``) fit a BertModel (``encoder…``)."""
    full = captured_base("bert")
    adapterhub.load_adapterhub(full, FIXTURES / "bert" / "double_seq_bn")
    bare = BertModel(full.config).eval()
    bare.load_state_dict({k.removeprefix("bert."): v for k, v in captured_base("bert").state_dict().items()
                          if k.startswith("bert.")})
    adapterhub.load_adapterhub(bare, FIXTURES / "bert" / "double_seq_bn")
    inputs = _inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(bare(**inputs).last_hidden_state, full.bert(**inputs).last_hidden_state,
                                   atol=1e-6, rtol=0)


def test_only_adapterhub_placed_adapters_save_in_its_format(tmp_path):
    model = slimtune.add_adapter(captured_base("llama"), slimtune.BottleneckConfig(adapter_type="pfeiffer"))
    with pytest.raises(ValueError, match="placement='adapterhub'.*placed 'projection'.*slimtune.save_adapter"):
        adapterhub.save_adapterhub(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_architectures_are_refused_with_the_alternative():
    with pytest.raises(ValueError, match="BERT-, GPT-2- and Llama|placement='projection'"):
        slimtune.add_adapter(tiny_t5(), slimtune.BottleneckConfig(placement="adapterhub"))


def test_init_from_an_adapterhub_folder_takes_its_architecture_and_weights():
    folder = FIXTURES / "gpt2" / "options"
    config = slimtune.BottleneckConfig(init_from=str(folder))
    assert config.placement == "adapterhub" and config.reduction_factor == {"0": 2, "default": 8}
    assert config.scaling == "channel" and config.use_gating and config.leave_out == [1]
    model = slimtune.add_adapter(captured_base("gpt2"), config)
    torch.testing.assert_close(logits(model, _inputs("gpt2")), captured("gpt2")["options.logits"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"the folder's reduction_factor=.*differs.*reduction_factor=4"):
        slimtune.BottleneckConfig(init_from=str(folder), reduction_factor=4)
    assert slimtune.BottleneckConfig(init_from=str(folder), non_linearity="gelu_new").non_linearity == "gelu_new"


def test_init_from_refuses_pickle_files(tmp_path):
    folder = _copy(tmp_path, "llama", "seq_bn")
    torch.save(load_file(folder / "adapter.safetensors"), folder / "pytorch_adapter.bin")
    (folder / "adapter.safetensors").unlink()
    model = captured_base("llama")
    with pytest.raises(ValueError, match="reads safetensors only.*allow_pickle=True.*save_adapterhub"):
        slimtune.add_adapter(model, slimtune.BottleneckConfig(init_from=str(folder)))
    assert find_state(model) is None


@pytest.mark.parametrize("placement", ["adapterhub", "projection"])
def test_slimtune_format_round_trip_and_init_from_it(placement, tmp_path):
    base = captured_base("llama")
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.BottleneckConfig(
        placement=placement, adapter_type="pfeiffer", reduction_factor=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    slimtune.save_adapter(model, tmp_path / "mine")
    saved = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert "init_from" not in saved and (saved.get("placement") == "adapterhub") == (placement == "adapterhub")
    inputs = sample_inputs("llama")
    expected = logits(model, inputs)
    torch.testing.assert_close(logits(slimtune.load_adapter(copy.deepcopy(base), tmp_path / "mine"), inputs),
                               expected, atol=0, rtol=0)
    started = slimtune.add_adapter(copy.deepcopy(base), slimtune.BottleneckConfig(init_from=str(tmp_path / "mine")))
    torch.testing.assert_close(logits(started, inputs), expected, atol=0, rtol=0)
    assert all(p.requires_grad for n, p in started.named_parameters() if ".default." in n)  # it trains from there


def test_folders_without_a_version_get_adapters_legacy_activation_names(tmp_path):
    """adapter-transformers wrote no "version" and meant "gelu_new" by "gelu": adapters renames it, so does slimtune."""
    folder = _copy(tmp_path, "llama", "b")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["config"]["non_linearity"] == "gelu"
    del config["version"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert slimtune.BottleneckConfig(init_from=str(folder)).non_linearity == "gelu_new"
