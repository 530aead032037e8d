"""Model loading: local folders, pickle refusal, task types, the GGUF cache, the default model."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import weakref

import pytest
import torch
from train_helpers import make_tokenizer, tiny_llama

from slimtune.core.tensor_files import SafetensorsReader
from slimtune.errors import InvalidFileError
from slimtune.quant import Linear4bit, QuantConfig, QuantizedLinear, dequantize_model, quantize
from slimtune.train import models, quantized_loading
from slimtune.train.models import cache_root, ensure_converted, load_model_and_tokenizer, resolve_model_path


class NotATensor:
    """Pickled beside weights: torch's weights-only reader refuses to build it (it could be any code)."""


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------- local folders
def test_quantized_load_streams_one_layer_at_a_time_with_identical_bytes(llama_dir, monkeypatch):
    """With a quantization config the model is built on the meta device and each linear weight is quantized as
    it is read: at no moment are two layers' full-precision weights alive, and the packed bytes equal those of
    quantizing the loaded full-precision model."""
    reference, _ = load_model_and_tokenizer(llama_dir)
    quantize(reference, QuantConfig())
    alive: dict[str, weakref.ref] = {}
    moments = []
    read = SafetensorsReader.get_tensor

    def tracked(self, name):
        tensor = read(self, name)
        alive[name] = weakref.ref(tensor)
        moments.append({k for k, ref in alive.items() if ref() is not None})
        return tensor

    monkeypatch.setattr(SafetensorsReader, "get_tensor", tracked)
    model, _ = load_model_and_tokenizer(llama_dir, quantization=QuantConfig())
    quantized = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 14 and max(len(moment & set(quantized)) for moment in moments) == 1
    expected = dict(reference.named_modules())
    for name, layer in quantized.items():
        ref = expected[name.removesuffix(".weight")]
        for key, tensor in layer.storage_tensors().items():
            assert torch.equal(tensor, ref.storage_tensors()[key]), (name, key)


@pytest.mark.parametrize("stored, asked", [(torch.float32, "bfloat16"), (torch.bfloat16, "float32")])
def test_quantized_load_quantizes_in_the_dtype_asked_for(tmp_path, tokenizer, stored, asked):
    """Each weight is cast to the asked dtype before it is quantized, as from_pretrained(dtype=) casts it: the
    packed bytes equal quantizing the loaded model, and a dequantized layer has the model's dtype. The model
    comes back in eval mode (no dropout), as from_pretrained returns it."""
    tiny_llama(vocab_size=len(tokenizer)).to(stored).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reference, _ = load_model_and_tokenizer(tmp_path, dtype=asked)
    quantize(reference, QuantConfig())
    model, _ = load_model_and_tokenizer(tmp_path, dtype=asked, quantization=QuantConfig())
    assert not any(m.training for m in model.modules())
    expected = dict(reference.named_modules())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    for name, layer in layers.items():
        assert layer.dtype == getattr(torch, asked) == expected[name].dtype
        for key, tensor in layer.storage_tensors().items():
            assert torch.equal(tensor, expected[name].storage_tensors()[key]), (name, key)
    dequantize_model(model)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == getattr(torch, asked)


def test_local_folder_loads_with_same_weights(llama_dir):
    model, tok = load_model_and_tokenizer(llama_dir)
    reference = tiny_llama(vocab_size=len(tok))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
    assert tok.pad_token == "<|im_end|>" and model.config.pad_token_id == tok.pad_token_id
    assert model.config.use_cache is False and model.generation_config.use_cache is True
    half, _ = load_model_and_tokenizer(str(llama_dir), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_task_types(llama_dir, tmp_path, tokenizer):
    classifier, _ = load_model_and_tokenizer(llama_dir, task_type="SEQ_CLS", num_labels=3)
    assert type(classifier).__name__ == "LlamaForSequenceClassification" and classifier.score.out_features == 3
    tagger, _ = load_model_and_tokenizer(llama_dir, task_type="TOKEN_CLS", num_labels=5)  # a new tagging head
    assert type(tagger).__name__ == "LlamaForTokenClassification" and tagger.score.out_features == 5
    quantized = models.load_model(llama_dir, task_type="TOKEN_CLS", num_labels=5, quantization=QuantConfig())
    assert quantized.score.out_features == 5 and not isinstance(quantized.score, Linear4bit)  # heads stay full
    assert 0.01 < float(quantized.score.weight.std()) < 0.03  # initialized as from_pretrained does (std 0.02)
    import shutil

    from safetensors.torch import load_file, save_file

    headless = shutil.copytree(llama_dir, tmp_path / "headless")
    state = {k: v.clone() for k, v in load_file(str(headless / "model.safetensors")).items() if k != "lm_head.weight"}
    save_file(state, str(headless / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor for .*lm_head"):  # a missing LM head is no new task head
        models.load_model(headless, quantization=QuantConfig())
    with pytest.raises(ValueError, match=r"model_type 'llama'\) has no SEQ_2_SEQ_LM variant"):
        load_model_and_tokenizer(llama_dir, task_type="SEQ_2_SEQ_LM")
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0))
    t5.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seq2seq, _ = load_model_and_tokenizer(tmp_path, task_type="SEQ_2_SEQ_LM")
    assert type(seq2seq).__name__ == "T5ForConditionalGeneration"
    with pytest.raises(ValueError, match=r"no CAUSAL_LM variant in transformers; `slimtune train` fine-tunes causal"):
        load_model_and_tokenizer(tmp_path)  # not "pick a task_type": train refuses the others


def test_argument_errors(llama_dir):
    with pytest.raises(ValueError, match=r"task_type 'CLM' is not supported; use one of \['CAUSAL_LM'"):
        load_model_and_tokenizer(llama_dir, task_type="CLM")
    with pytest.raises(ValueError, match=r"num_labels=2 only applies to task types with a label head \('SEQ_CLS', "
                                         r"'TOKEN_CLS'\), not 'CAUSAL_LM'"):
        load_model_and_tokenizer(llama_dir, num_labels=2)
    with pytest.raises(ValueError, match="dtype='float33' is not supported"):
        load_model_and_tokenizer(llama_dir, dtype="float33")


def test_pickle_weights_are_refused_unless_allowed(llama_dir, tmp_path):
    from transformers import AutoConfig

    AutoConfig.from_pretrained(llama_dir).save_pretrained(tmp_path)
    torch.save(tiny_llama(vocab_size=387).state_dict(), tmp_path / "pytorch_model.bin")
    pattern = r"only pickle weights \['pytorch_model.bin'\].*arbitrary code.*allow_pickle=True"
    with pytest.raises(ValueError, match=pattern):
        resolve_model_path(tmp_path)
    assert resolve_model_path(tmp_path, allow_pickle=True) == tmp_path
    model, _ = load_model_and_tokenizer(tmp_path, allow_pickle=True, tokenizer_name_or_path=llama_dir)
    torch.testing.assert_close(model.lm_head.weight, tiny_llama(vocab_size=387).lm_head.weight)
    torch.save({"model.norm.weight": torch.ones(32), "extra": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"{tmp_path}: its pickle weights hold more than tensors") as refused:
        load_model_and_tokenizer(tmp_path, allow_pickle=True, tokenizer_name_or_path=llama_dir)
    assert "weights_only" not in str(refused.value)  # torch's advice to unpickle it unrestricted is not repeated


def test_a_damaged_or_incomplete_checkpoint_is_refused_by_name_in_full_precision_as_in_4_bits(llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from slimtune.errors import InvalidFileError

    def copy(name):
        folder = tmp_path / name
        shutil.copytree(llama_dir, folder)
        return folder

    weights = load_file(llama_dir / "model.safetensors")
    missing = copy("missing")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp.down_proj" not in k}, missing / "model.safetensors")
    truncated = copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    for quantization in (None, QuantConfig()):
        with pytest.raises(ValueError, match=r"no tensor for 1 model entries, e.g. \['model.layers.1.mlp.down_proj"):
            load_model_and_tokenizer(missing, quantization=quantization)
    with pytest.raises(InvalidFileError, match=rf"{truncated}: a weights file is damaged or truncated"):
        load_model_and_tokenizer(truncated)
    wider = copy("wider")
    config = (wider / "config.json").read_text().replace('"intermediate_size": 64', '"intermediate_size": 96')
    assert config != (wider / "config.json").read_text()
    (wider / "config.json").write_text(config)
    with pytest.raises(InvalidFileError, match=rf"{wider}: the weights do not fit the model its config.json describes"):
        load_model_and_tokenizer(wider)
    model, _ = load_model_and_tokenizer(llama_dir, task_type="SEQ_CLS", num_labels=3)  # a new head: initialized
    assert model.score.weight.shape[0] == 3
    from transformers import BertConfig, BertForMaskedLM, LlamaModel

    BertForMaskedLM(BertConfig(vocab_size=387, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64)).save_pretrained(tmp_path / "mlm")
    for quantization in (None, QuantConfig()):  # a masked LM's checkpoint has no pooler: new, in both loads
        bert = models.load_model(tmp_path / "mlm", task_type="SEQ_CLS", quantization=quantization)
        assert bert.bert.pooler.dense.weight.shape == (32, 32) and not bert.bert.pooler.dense.weight.is_meta
    no_norm = copy("no_norm")  # a part of the checkpoint's own class missing: incomplete, not new, in any task
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, no_norm / "model.safetensors")
    for quantization in (None, QuantConfig()):
        for task in ("CAUSAL_LM", "SEQ_CLS"):
            with pytest.raises(ValueError, match=r"no tensor for 1 model entries, e.g. \['model.norm.weight'\]"):
                models.load_model(no_norm, task_type=task, quantization=quantization)
    with pytest.raises(ValueError, match=r"no tensor for 1 model entries, e.g. \['norm.weight'\]"):
        models.load_model(no_norm, task_type="FEATURE_EXTRACTION")  # the base model alone: named without "model."
    LlamaModel(tiny_llama(vocab_size=387).config).save_pretrained(tmp_path / "no-head")  # the body alone
    with pytest.raises(InvalidFileError, match=r"no tensor for 1 model entries, e.g. \['lm_head.weight'\]"):
        models.load_model(tmp_path / "no-head")


def test_bad_paths_name_the_path_and_the_fix(tmp_path, llama_dir):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(f"Model path '{missing}' does not exist. Pass 'default'")):
        resolve_model_path(missing)
    with pytest.raises(ValueError, match=r"has no config.json \(it contains \['notes.txt'\]\)"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("x")
        resolve_model_path(tmp_path / "empty")
    with pytest.raises(ValueError, match="is a file; pass the folder"):
        resolve_model_path(llama_dir / "config.json")
    with pytest.raises(ValueError, match="Could not load a tokenizer from"):
        load_model_and_tokenizer(llama_dir, tokenizer_name_or_path=tmp_path / "empty")


def test_unknown_hub_id_fails_offline_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "slimtune-tests/no-such-model"
    with pytest.raises(FileNotFoundError, match=rf"'{name}' is not a local folder or file.*"
                                                rf"huggingface-cli download {name} --local-dir DIR"):
        resolve_model_path(name)


# ------------------------------------------------------------------------------------ GGUF cache
def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("SLIMTUNE_CACHE")
    assert cache_root() == models.Path.home() / ".cache" / "slimtune"


def test_conversion_is_cached_and_atomic(tmp_path):
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(b"GGUF-v1")
    calls = []

    def fake_convert(source, dest):
        calls.append(dest)
        (dest / "config.json").write_text("{}")

    def failing_convert(source, dest):
        (dest / "half-written.safetensors").write_text("x")
        raise RuntimeError("disk full")

    target = tmp_path / "cache" / "toy"
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_converted(gguf, target, convert=failing_convert)
    assert not target.exists() and os.listdir(target.parent) == []  # nothing half-written is left
    assert ensure_converted(gguf, target, convert=fake_convert) == target
    assert ensure_converted(gguf, target, convert=fake_convert) == target
    assert len(calls) == 1 and calls[0] != target and (target / "config.json").exists()
    gguf.write_bytes(b"GGUF-v2, another size")  # another file under the same name: converted again
    ensure_converted(gguf, target, convert=fake_convert)
    assert len(calls) == 2 and sorted(os.listdir(target.parent)) == ["toy"]
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf' does not exist"):
        ensure_converted(tmp_path / "missing.gguf", convert=fake_convert)
    same_size = tmp_path / "new.gguf"  # rewritten in place, same size (an export after more training)
    same_size.write_bytes(b"GGUF-v3, another text")
    os.replace(same_size, gguf)
    ensure_converted(gguf, target, convert=fake_convert)
    assert len(calls) == 3


def test_files_of_one_name_convert_to_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "run1" / "model.gguf", tmp_path / "run2" / "model.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"GGUF same size")
    written = []

    def fake_convert(source, dest):
        written.append(source)
        (dest / "config.json").write_text(str(source))

    folders = [ensure_converted(path, convert=fake_convert) for path in (a, b, a, b)]
    assert folders[0] != folders[1] and folders[:2] == folders[2:] and written == [a, b]
    assert (folders[0] / "config.json").read_text() == str(a) and folders[0].name.startswith("model-")


def _gguf_file(folder, seed: int = 0):
    from slimtune.gguf_export import write_gguf

    tokenizer = make_tokenizer()
    return write_gguf(tiny_llama(vocab_size=len(tokenizer), seed=seed), tokenizer, folder / "model.gguf", "f32")


def test_a_gguf_tokenizer_splits_as_its_files_pre_tokenizer_says(tmp_path):
    from slimtune.gguf_export import write_gguf

    tokenizer = make_tokenizer()
    path = write_gguf(tiny_llama(vocab_size=len(tokenizer)), tokenizer, tmp_path / "m.gguf", "f32", pre="smollm")
    loaded = models.load_tokenizer(str(path))  # transformers alone rebuilds it as plain ByteLevel
    words = lambda t: [w for w, _ in t.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x 42")]  # noqa: E731
    assert words(loaded) == ["x", "Ġ", "4", "2"] and words(tokenizer) == ["x", "Ġ42"]


def test_a_model_from_gguf_names_its_file_and_adapters_record_it(tmp_path):
    import slimtune
    from slimtune.train.inference import base_model_of

    path = _gguf_file(tmp_path)
    model, _ = load_model_and_tokenizer(str(path))
    assert model.config._name_or_path == str(path.resolve())  # not the shared cache folder
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    slimtune.save_adapter(model, tmp_path / "adapter")
    assert base_model_of(tmp_path / "adapter") == str(path.resolve())
    upper = tmp_path / "MODEL.GGUF"  # an upper-case suffix is a GGUF file too
    upper.write_bytes(path.read_bytes())
    assert load_model_and_tokenizer(str(upper))[0].config._name_or_path == str(upper.resolve())


def test_gguf_files_that_hold_no_model_are_refused_by_name(tmp_path):
    import gguf

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(_gguf_file(tmp_path).read_bytes()[:-2000])
    with pytest.raises(ValueError, match=r"cut\.gguf is not a readable GGUF file.*complete"):
        resolve_model_path(str(cut))
    writer = gguf.GGUFWriter(tmp_path / "adapter.gguf", "llama")
    writer.add_type("adapter")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"adapter\.gguf is a GGUF adapter .*not a model.*--lora"):
        resolve_model_path(str(tmp_path / "adapter.gguf"))
    assert not any((cache_root() / "models").glob("cut-*")) and not any((cache_root() / "models").glob("adapter-*"))


# --------------------------------------------------------------------------------- default model
needs_default = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec(models.DEFAULT_MODEL_PACKAGE) is None,
    reason=f"{models.DEFAULT_MODEL_DISTRIBUTION} is not installed",
)


@needs_default
def test_default_gguf_is_located_without_importing_its_package():
    path = models.default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert models.DEFAULT_MODEL_PACKAGE not in sys.modules  # its __init__ needs `llm`, not installed


def _slow_selected(config) -> bool:
    markexpr = config.getoption("markexpr") or ""
    return os.environ.get("SLIMTUNE_SLOW") == "1" or bool(re.search(r"(?<!not )\bslow\b", markexpr))


@needs_default
@pytest.mark.slow
def test_default_model_converts_once_then_loads_from_cache(request, tmp_path, monkeypatch):
    """~50 s: runs with `pytest -m slow` or SLIMTUNE_SLOW=1 (the default suite stays fast)."""
    if not _slow_selected(request.config):
        pytest.skip("converts the real default model (~50 s); select with -m slow or SLIMTUNE_SLOW=1")
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    model, tok = load_model_and_tokenizer("default")
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1" / "model.safetensors").exists()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    start = time.perf_counter()
    again, _ = load_model_and_tokenizer("default")
    assert time.perf_counter() - start < 20
    torch.testing.assert_close(again.model.embed_tokens.weight, model.model.embed_tokens.weight, atol=0, rtol=0)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.isfinite(model(ids).logits).all() and out.shape[1] > ids.shape[1]


def test_a_whole_load_that_needs_bitsandbytes_says_so(llama_dir, tmp_path, monkeypatch):
    """A checkpoint transformers must load whole (merged expert tensors) and that bitsandbytes quantized needs
    bitsandbytes for that load: the error says so instead of transformers' bare ImportError."""
    import transformers

    from slimtune.quant import CheckpointNeedsMerging

    def needs_merging(*args, **kwargs):
        raise CheckpointNeedsMerging("experts are merged while loading")

    def no_bitsandbytes(*args, **kwargs):
        raise ImportError("bitsandbytes is not installed")

    monkeypatch.setattr(quantized_loading, "load_quantized", needs_merging)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", no_bitsandbytes)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_bitsandbytes)
    with pytest.raises(ImportError, match="bitsandbytes is not installed"):  # not a bitsandbytes folder: as raised
        models.load_model(str(llama_dir), quantization=QuantConfig())
    import json
    import shutil

    folder = shutil.copytree(llama_dir, tmp_path / "bnb")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantized by bitsandbytes .*install bitsandbytes to load it"):
        models.load_model(str(folder), quantization=QuantConfig())


def test_a_folder_asking_for_its_own_code_is_refused_by_name_and_known_types_load(llama_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "modeling_x.py").write_text("raise SystemExit('remote code ran')\n")
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (folder / "config.json").write_text(json.dumps(config))
    assert models.load_model(folder) is not None  # a known model_type: transformers' own class, no code run
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "my_custom_arch"}))
    with pytest.raises(ValueError, match=rf"{folder}'?: its config.json asks for code of its own \(auto_map\) for "
                                         r"model_type 'my_custom_arch'.*never runs code from a model folder"):
        models.load_model(folder)


@pytest.mark.parametrize("section", [None, QuantConfig(bits=8)], ids=["no-section", "another-section"])
def test_a_bitsandbytes_folder_loads_into_slimtunes_layers_as_stored(llama_dir, tmp_path, section, caplog):
    """A folder transformers + bitsandbytes saved quantized: without a quantization section it kept bitsandbytes'
    layers (whose CPU path, once run in eval mode, has no backward: every LoRA gradient was wrong), and a section
    quantized the layers its producer kept in full precision (q_proj here). It loads as stored, into slimtune's
    layers, as transformers loads it (a config passed for a quantized folder does not apply, with a warning)."""
    from oracles import bitsandbytes_oracle
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = bitsandbytes_oracle()
    stored = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head", "q_proj"])
    theirs = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=stored, device_map="cpu",
                                                  dtype=torch.float32).eval()
    theirs.save_pretrained(tmp_path / "bnb")
    config = json.loads((tmp_path / "bnb" / "config.json").read_text())
    del config["quantization_config"]["llm_int8_skip_modules"]  # the files alone say which layers stay full precision
    (tmp_path / "bnb" / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="slimtune"):
        ours = models.load_model(str(tmp_path / "bnb"), quantization=section)
    assert not [n for n, m in ours.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    quantized = {n for n, m in ours.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == {n for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert quantized == {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and not any(n.endswith("q_proj") for n in quantized)
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
    assert ("do not apply" in caplog.text) is (section is not None)


def test_a_quantized_config_without_quantized_weights_is_refused(llama_dir, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(llama_dir, tmp_path / "plain")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no layer in its weights is stored quantized; remove quantization_config"):
        models.load_model(str(folder))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_without_a_quantization_config_are_refused_or_loaded_as_stored(llama_dir, tmp_path, bits):
    """slimtune's own quantized checkpoint in a model folder (config.json without quantization_config): the 8-bit
    codes were read as float weights, silently (4-bit ones failed on their shapes). Refused without a section,
    loaded as stored with one; a packed weight whose quantization state is missing is named as such (it was
    called a float overflow)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from slimtune.quant import save_quantized

    folder = tmp_path / "quantized"
    folder.mkdir()
    shutil.copy(llama_dir / "config.json", folder)
    model = models.load_model(str(llama_dir))
    save_quantized(quantize(model, QuantConfig(bits=bits)), folder)
    with pytest.raises(InvalidFileError, match=r"stored quantized \(e\.g\. .*\) but config\.json has no"):
        models.load_model(str(folder))
    loaded = models.load_model(str(folder), quantization=QuantConfig(bits=bits))
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    tensors = load_file(folder / "model.safetensors")
    state = next(k for k in tensors if k.endswith((".SCB", "quant_state.bitsandbytes__nf4")))
    save_file({k: v for k, v in tensors.items() if k != state}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"weight is stored as torch\.(int8|uint8) \(quantized codes\?\) without a"):
        models.load_model(str(folder), quantization=QuantConfig(bits=bits, skip_modules=[]))


def test_models_load_without_the_hubs_layer_kernels(monkeypatch):
    """transformers 5.25 swaps layers for the Hub's `kernels` in from_pretrained unless use_kernels=False (its
    default is on): every load of slimtune's says False where the release knows the argument."""
    import transformers
    from run_helpers import tiny_model_dir

    seen = []
    original = transformers.PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("use_kernels", "absent"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    models.load_model(tiny_model_dir())
    knows = hasattr(transformers.PreTrainedModel, "set_use_kernels")
    assert seen and all(v is (False if knows else "absent") for v in seen), seen
