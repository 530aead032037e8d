"""The trust boundary: what others hand slimtune (adapters, models, data, recipes) is read, never run.

- nothing from others is unpickled: safetensors, JSON and ``yaml.safe_load`` only (a pickle adapter only with
  ``allow_pickle=True``, and then through torch's weights-only loader); checked in the source and by loading
  hostile files;
- a model folder that asks for its own code (``auto_map``) never gets it run (``trust_remote_code`` is never
  passed);
- names and folders from configs stay inside the folder they came with (no ``..``, absolute paths or links);
- a loaded adapter cannot add modules or parameters its config did not declare, nor write into base weights.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_model_dir
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama

import slimtune
from slimtune.errors import InvalidFileError
from slimtune.methods.fusion import AdapterFusionConfig
from slimtune.quant import QuantConfig
from slimtune.train.checkpoint import _self_digest, read_checkpoint, save_checkpoint
from slimtune.train.models import load_model

SRC = Path(slimtune.__file__).parent
UNSAFE_MODULES = {"pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def unsafe_reads(source: str, where: str) -> list[str]:
    """The ways ``source`` could run code from a file: pickle-like imports, ``torch.load`` without
    ``weights_only=True``, YAML loaders other than ``safe_load``, ``trust_remote_code`` set to anything."""
    tree, found = ast.parse(source), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                                                    else [])
            found += [f"{where}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            found.append(f"{where}:{node.value.lineno} passes trust_remote_code")
    for call, name in _calls(tree):
        weights_only = {k.arg: k.value for k in call.keywords}.get("weights_only")
        if name == "torch.load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"{where}:{call.lineno} torch.load without weights_only=True")
        if name.startswith("yaml.") and name.removeprefix("yaml.") in UNSAFE_YAML:
            found.append(f"{where}:{call.lineno} {name}")
        if name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in call.keywords):
            found.append(f"{where}:{call.lineno} {name}(allow_pickle=...)")
    return found


def test_the_source_never_unpickles_or_runs_remote_code():
    found = [hit for path in sorted(SRC.rglob("*.py"))
             for hit in unsafe_reads(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)))]
    assert found == []
    # the checker itself sees each of them
    bad = "import pickle\nimport yaml, torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\nyaml.load(s)\n" \
          "AutoModel.from_pretrained(p, trust_remote_code=flag)\n"
    assert len(unsafe_reads(bad, "x")) == 5


class Boom:
    """Unpickling this runs code (writes ``marker``), which a weights-only loader must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_hostile_pickle_adapter_is_refused_even_when_pickles_are_allowed(tmp_path):
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"]))
    folder = slimtune.save_adapter(model, tmp_path / "adapter")
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "marker"
    with open(folder / "adapter_model.bin", "wb") as fh:
        pickle.dump({**tensors, "x": Boom(marker)}, fh)
    fresh = tiny_llama()
    with pytest.raises(InvalidFileError, match=r"adapter_model\.bin: refusing to load a pickle file"):
        slimtune.load_adapter(fresh, folder)
    with pytest.raises(InvalidFileError, match=r"adapter_model\.bin: refused by torch's weights-only loader") as info:
        slimtune.load_adapter(fresh, folder, allow_pickle=True)
    assert "weights_only" not in str(info.value)  # torch's advice to unpickle it unrestricted is not passed on
    assert not marker.exists() and not hasattr(fresh, "slimtune_state")
    from slimtune.adapterhub import load_adapterhub, save_adapterhub  # AdapterHub's pickles: the same reader

    hub = slimtune.add_adapter(tiny_llama(), slimtune.BottleneckConfig(placement="adapterhub"), "a")
    save_adapterhub(hub, tmp_path / "hub", "a")
    (tmp_path / "hub" / "adapter.safetensors").unlink()
    (tmp_path / "hub" / "pytorch_adapter.bin").write_bytes(b"not a pickle")
    with pytest.raises(InvalidFileError, match=r"pytorch_adapter\.bin: refused by torch's weights-only loader"):
        load_adapterhub(tiny_llama(), tmp_path / "hub", allow_pickle=True)


def test_an_old_pickle_checkpoint_is_refused_not_read(tmp_path):
    step = tmp_path / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    marker = tmp_path / "marker"
    with open(step / "optimizer.pt", "wb") as fh:
        pickle.dump(Boom(marker), fh)
    with pytest.raises(InvalidFileError, match=r"optimizer\.pt: pickles, which this version does not read"):
        read_checkpoint(step)
    assert not marker.exists()


@pytest.mark.parametrize("model_type", ["llama", "evil_model"])
@pytest.mark.parametrize("quantized", [False, True])
def test_a_model_folder_asking_for_its_own_code_never_gets_it_run(tmp_path, model_type, quantized):
    folder = Path(shutil.copytree(tiny_model_dir(), tmp_path / "model"))
    marker = tmp_path / "marker"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'evil_model'\n"
                                    "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    quant = QuantConfig() if quantized else None
    if model_type == "llama":  # transformers' own class is used; the folder's code is not imported
        model = load_model(folder, quantization=quant)
        assert type(model).__module__.startswith("transformers.")
    else:  # only the folder's code could build it: refused
        with pytest.raises(ValueError, match="trust_remote_code"):
            load_model(folder, quantization=quant)
    assert not marker.exists()


# ---- names and folders from configs stay inside -------------------------------------------------------------------
def _fusion_folder(tmp_path) -> Path:
    model = tiny_llama()
    for name in ("a", "b"):
        slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", reduction_factor=8), name,
                             activate=False)
    slimtune.add_adapter(model, AdapterFusionConfig(adapter_names=["a", "b"]), "fusion")
    folder = slimtune.save_adapter(model, tmp_path / "fusion", "fusion")
    for name in ("a", "b"):  # the fused adapters inside the fusion's folder
        slimtune.save_adapter(model, folder / "fused" / name, name)
    return folder


def _set_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))


def test_config_folders_inside_the_adapter_load(tmp_path):
    folder = _fusion_folder(tmp_path)
    _set_config(folder, adapter_paths={"a": "fused/a", "b": "fused/b"})
    model = slimtune.load_adapter(tiny_llama(), folder, "fusion")
    assert {"a", "b", "fusion"} <= set(slimtune.core.state.get_state(model).configs)


@pytest.mark.parametrize("where", ["../outside", "ABSOLUTE", "fused/../../outside", "link"])
def test_config_folders_that_leave_the_adapter_are_refused(tmp_path, where):
    folder = _fusion_folder(tmp_path)
    outside = Path(shutil.copytree(folder / "fused" / "a", tmp_path / "outside"))
    (folder / "link").symlink_to(outside)
    _set_config(folder, adapter_paths={"a": str(outside) if where == "ABSOLUTE" else where, "b": "fused/b"})
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidFileError, match=r"adapter_config\.json: adapter_paths: .*(leaves|symbolic link)"):
        slimtune.load_adapter(model, folder, "fusion")
    assert model.state_dict().keys() == before.keys() and not hasattr(model, "slimtune_state")
    if where != "link":  # the caller (not the config) may say the folders are trusted
        slimtune.load_adapter(model, folder, "fusion", allow_outside_paths=True)


@pytest.mark.parametrize("name", ["../a", "/abs", ".hidden", "a.b", ""])
def test_adapter_names_from_a_config_must_be_plain(tmp_path, name):
    folder = _fusion_folder(tmp_path)
    _set_config(folder, adapter_names=[name, "b"])
    with pytest.raises(InvalidFileError, match=r"adapter_config\.json: adapter_names"):
        slimtune.load_adapter(tiny_llama(), folder, "fusion")


def test_a_checkpoint_cannot_point_outside_itself_and_its_folder_cannot_be_a_link(tmp_path):
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    state = {"step": 1, "tokens": 0, "train_seconds": 0.0, "data": {}, "evals": [], "total_steps": 2, "config": {}}
    step = save_checkpoint(tmp_path / "run", 1, model, optimizer, scheduler, rng, state, keep=2)
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    payload = json.loads((step / "trainer_state.json").read_text())
    payload["files"]["../../../secret.txt"] = {"bytes": 9, "sha256": "0" * 64}
    payload["checksum"] = _self_digest(payload)
    (step / "trainer_state.json").write_text(json.dumps(payload))
    with pytest.raises(InvalidFileError, match=r"leaves .*step-000001"):
        read_checkpoint(step)
    linked = tmp_path / "linked"
    (linked / "elsewhere").mkdir(parents=True)
    (linked / "run").mkdir()
    os.symlink(linked / "elsewhere", linked / "run" / "checkpoints")
    with pytest.raises(ValueError, match="symbolic link"):
        save_checkpoint(linked / "run", 1, model, optimizer, scheduler, rng, state, keep=2)
    assert list((linked / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("change, message", [
    ({"step": 1000000}, r"step=1000000 of total_steps=2 is out of range"),
    ({"step": -3}, r"step=-3 of total_steps=2 is out of range"),
    ({"tokens": -1}, r"tokens=-1 or train_seconds=0.0 is out of range"),
    ({"train_seconds": float("nan")}, r"train_seconds=nan is out of range"),
    ({"evals": [1, "x", None]}, r"evals\[0\]=1 is not an evaluation of a step up to 1"),
    ({"evals": [{"step": 0, "eval_loss": "low"}]}, r"evals\[0\]=.* is not an evaluation"),
    ({"evals": [{"step": 5, "eval_loss": 1.0}]}, r"evals\[0\]=.* is not an evaluation of a step up to 1"),
])
def test_a_checkpoint_whose_counters_are_out_of_range_is_refused_even_when_resealed(tmp_path, change, message):
    """The checksum guards against damage, not against a tool that rewrites it: the values a resume trusts (steps
    left to train, the run's evaluation history) are checked too."""
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    state = {"step": 1, "tokens": 0, "train_seconds": 0.0, "data": {}, "total_steps": 2, "config": {},
             "evals": [{"step": 0, "eval_loss": 2.5}]}
    step = save_checkpoint(tmp_path / "run", 1, model, optimizer, scheduler, rng, state, keep=2)
    read_checkpoint(step)  # as written: accepted
    payload = {**json.loads((step / "trainer_state.json").read_text()), **change}
    payload["checksum"] = _self_digest(payload)
    (step / "trainer_state.json").write_text(json.dumps(payload))
    with pytest.raises(InvalidFileError, match=message + r".*damaged\. Delete this step's folder"):
        read_checkpoint(step)


# ---- an adapter brings only what its config declares -------------------------------------------------------------
@pytest.mark.parametrize("extra", ["base_model.model.model.layers.0.self_attn.q_proj.weight",
                                   "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
                                   "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
                                   "base_model.model.lm_head.weight"])
def test_an_adapter_file_cannot_add_modules_or_write_base_weights(tmp_path, extra):
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"]))
    folder = slimtune.save_adapter(model, tmp_path / "adapter")
    tensors = load_file(folder / "adapter_model.safetensors")
    live = tiny_llama().state_dict()
    shape = live[extra.removeprefix("base_model.model.")].shape if "lora" not in extra else (4, 32)
    save_file({**tensors, extra: torch.zeros(shape)}, folder / "adapter_model.safetensors")
    fresh = tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    message = rf"'{extra}' would change row 0 of the base's" if extra.endswith("lm_head.weight") else \
        rf"adapter_model\.safetensors: tensor '{extra}' does not belong"  # (a resized vocabulary's rows may come)
    with pytest.raises(InvalidFileError, match=message):
        slimtune.load_adapter(fresh, folder)
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert {n for n, _ in fresh.named_modules()} == {n for n, _ in tiny_llama().named_modules()}
