"""Fuzzed inputs only ever get clear errors: recipes and overrides, adapter folders, data files, checkpoints.

Each test starts from a valid input (a recipe, a saved adapter, a data file, a checkpoint), lets hypothesis
change it (wrong types, unknown values, negative or huge sizes, missing or extra fields, cut or altered bytes,
tampered headers, invalid UTF-8, …) and loads the result. Pass: the input loads, or the error is one of
slimtune's own (:mod:`slimtune.errors`) whose message names the file and the bad key or value; anything else
(``AttributeError``, ``IndexError``, a traceback from deep inside torch) fails the test. A failed load leaves
the model (``state_dict``, module tree, ``requires_grad``), the optimizer and the RNG bit-identical.

Profiles (tests/reliability/conftest.py): ``make test`` runs a fixed, derandomized set per input kind;
``SLIMTUNE_FUZZ=long`` a randomized, much longer one (``SLIMTUNE_FUZZ_EXAMPLES`` per kind), e.g.

    SLIMTUNE_FUZZ=long .venv/bin/python -m pytest -q -p no:randomly tests/reliability/test_fuzz.py

``SLIMTUNE_RELIABILITY_REPORT=<file>`` appends per kind: cases run, loaded, clear errors, anything else.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from crash import report
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from tiny_models import tiny_llama

import slimtune
from slimtune.errors import DataError, InvalidFileError, SlimtuneError
from slimtune.train.batching import BatchIterator
from slimtune.train.checkpoint import STATE_FILE, TENSORS_FILE, _self_digest, read_checkpoint
from slimtune.train.data import load_examples
from slimtune.train.recipe import RecipeError, TrainingSection, load_recipe
from slimtune.train.trainer import Trainer

PROFILE_NAME = "slimtune-long" if os.environ.get("SLIMTUNE_FUZZ") == "long" else "slimtune-default"
FUZZ = settings(settings.get_profile(PROFILE_NAME))
TALLY: dict[str, dict[str, int]] = {}


def outcome(kind: str, run: Callable[[], Any], check: Callable[[SlimtuneError], None]) -> SlimtuneError | None:
    """Run one fuzzed load; tally it; an error must be slimtune's own and pass ``check``."""
    tally = TALLY.setdefault(kind, {"cases": 0, "loaded": 0, "clear_errors": 0, "other": 0})
    tally["cases"] += 1
    try:
        run()
    except SlimtuneError as error:
        try:
            check(error)
        except AssertionError:
            tally["other"] += 1
            raise
        tally["clear_errors"] += 1
        return error
    except BaseException:
        tally["other"] += 1
        raise
    tally["loaded"] += 1
    return None


@pytest.fixture(scope="module", autouse=True)
def fuzz_report():
    yield
    for kind, tally in TALLY.items():
        report({"suite": "fuzz", "profile": PROFILE_NAME, "kind": kind, **tally})


# ---- values ---------------------------------------------------------------------------------------------------
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64),
                    st.sampled_from([0, -1, 1, 3, 2**31, 2**40, 10**15]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["q_proj", "all-linear", "LORA", "IA3", "nf4", "", "../x", "/etc/passwd"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)


def snapshot(model: torch.nn.Module) -> tuple:
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    types, weights, grads = before
    assert {n: type(m) for n, m in model.named_modules()} == types
    state = model.state_dict()
    assert state.keys() == weights.keys()
    assert all(v.dtype == weights[k].dtype and torch.equal(v, weights[k]) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


# ---- recipes and overrides ---------------------------------------------------------------------------------
BASE_RECIPE: dict[str, Any] = {
    "description": "fuzz",
    "model": {"name_or_path": "default", "device": "cpu", "dtype": "float32"},
    "method": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "quantization": {"bits": 4, "quant_type": "nf4", "blocksize": 64},
    "data": {"dataset": "pycode", "max_seq_length": 64},
    "training": {"max_steps": 5, "learning_rate": 2e-4, "optim": "adamw", "adam_betas": [0.9, 0.999]},
    "output": {"dir": "runs/{name}"},
    "demo": {"enabled": False},
}
RECIPE_KEYS = sorted({f"{section}.{key}" for section, values in BASE_RECIPE.items() if isinstance(values, dict)
                      for key in values} | {
    "method.rank_pattern", "method.alpha_pattern", "method.lora_dropout", "method.layers_to_transform",
    "method.modules_to_save", "method.peft_type", "method.use_dora", "training.warmup_ratio", "training.report_to",
    "training.save_every", "training.keep_checkpoints", "training.lr_scheduler", "model.config_overrides",
    "model.init", "model.gradient_checkpointing", "data.validation_fraction", "data.eval_dataset",
    "quantization.double_quant", "output.overwrite"})
KEY_PART = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
RECIPE_KEY = st.one_of(st.sampled_from(RECIPE_KEYS), st.lists(KEY_PART, min_size=1, max_size=3).map(".".join))


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    for part in key.split(".")[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key.split(".")[-1]] = value


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


@FUZZ
@given(mode=st.sampled_from(["file", "override", "raw"]), changes=st.lists(st.tuples(RECIPE_KEY, VALUES),
                                                                           min_size=1, max_size=2),
       raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
@example(mode="raw", changes=[("x", 1)], raw=b"\xff\xfe not utf-8")
@example(mode="raw", changes=[("x", 1)], raw=b"!!python/object/apply:os.system ['echo owned']")
@example(mode="raw", changes=[("x", 1)], raw=b"[" * 5000)
@example(mode="override", changes=[("training.learning_rate", float("nan"))], raw=b"")
@example(mode="file", changes=[("method.peft_type", [])], raw=b"")
def test_fuzzed_recipes_and_overrides_load_or_name_the_file_and_key(mode, changes, raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        data, overrides = copy.deepcopy(BASE_RECIPE), []
        if mode == "file":
            for key, value in changes:
                _set(data, key, value)
        elif mode == "override":
            overrides = [f"{key}={_yaml_scalar(value)}" for key, value in changes]
        if mode == "raw":
            path.write_bytes(raw)
        else:
            path.write_text(yaml.safe_dump(data, sort_keys=False))

        def check(error: SlimtuneError) -> None:
            message = str(error)
            assert isinstance(error, RecipeError) and str(path) in message, message
            if mode != "raw":  # the dotted key changed (or, for a key under a non-section, its first parts)
                assert any(".".join(key.split(".")[:i]) in message for key, _ in changes
                           for i in range(len(key.split(".")), 0, -1)), message

        outcome("recipe", lambda: load_recipe(path, overrides), check)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_non_finite_number_is_refused_where_every_range_check_would_pass_it(tmp_path, value):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE_RECIPE))
    with pytest.raises(RecipeError, match=rf"recipe {path}: training\.learning_rate: expected a number, got float"):
        load_recipe(path, [f"training.learning_rate={value}"])


# ---- adapter folders: adapter_config.json and adapter_model.safetensors ------------------------------------------
CONFIG_FIELDS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern",
                 "modules_to_save", "layers_to_transform", "layers_pattern", "bias", "use_dora", "use_rslora",
                 "fan_in_fan_out", "init_lora_weights", "task_type", "exclude_modules", "target_parameters",
                 "adapter_names", "adapter_paths", "num_virtual_tokens"]
CONFIG_VALUES = st.one_of(VALUES, st.sampled_from([-4, 0, 2**40, 10**12, "LORA", "IA3", "VERA", "LOHA", "BOTTLENECK",
                                                    "ADAPTER_FUSION", "PROMPT_TUNING", "NOPE", ["q_proj"],
                                                    {"q_proj": 2}, {"q_proj": "x"}, ["../../etc"], {"a": "/tmp"}]))


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory) -> Path:
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    return slimtune.save_adapter(model, tmp_path_factory.mktemp("fuzz") / "adapter")


def _load_into_fresh_model(folder: Path, kind: str, check: Callable[[SlimtuneError], None]) -> None:
    model = tiny_llama()
    before = snapshot(model)
    error = outcome(kind, lambda: slimtune.load_adapter(model, folder), check)
    if error is not None:
        assert_unchanged(model, before)
        assert not hasattr(model, "slimtune_state")


@FUZZ
@given(changes=st.lists(st.tuples(st.one_of(st.sampled_from(CONFIG_FIELDS), st.text(max_size=8)),
                                  st.one_of(st.just("<delete>"), CONFIG_VALUES)), min_size=1, max_size=3),
       whole=st.one_of(st.none(), VALUES))
@example(changes=[("r", -4)], whole=None)
@example(changes=[("r", 10**12)], whole=None)
@example(changes=[("peft_type", "<delete>")], whole=None)
@example(changes=[("rank_pattern", ["q_proj"])], whole=None)
@example(changes=[("target_modules", 3)], whole=None)
@example(changes=[("peft_type", "ADAPTER_FUSION"), ("adapter_names", ["../../x"])], whole=None)
def test_fuzzed_adapter_configs_load_or_name_the_file_and_field(adapter_folder, changes, whole):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(adapter_folder, Path(tmp) / "adapter"))
        config_file = folder / "adapter_config.json"
        config = json.loads(config_file.read_text())
        for key, value in changes:
            if value == "<delete>":
                config.pop(key, None)
            else:
                config[key] = value
        config_file.write_text(json.dumps(config if whole is None else whole))

        def check(error: SlimtuneError) -> None:
            message = str(error)
            assert isinstance(error, InvalidFileError) and str(folder) in message, message
            if error.path == str(config_file) and whole is None:  # about the config: names a field or value it
                # changed, or the field at fault (e.g. one the new peft_type needs), which the error also carries
                assert any(key in message or (value != "<delete>" and repr(value) in message)
                           for key, value in changes) or (error.key and error.key in message), message
            else:  # about the weights (a config that no longer fits them): names the tensor
                named = error.key and (error.key in message or repr(error.key)[1:-1] in message)
                assert named or "JSON" in message, message

        _load_into_fresh_model(folder, "adapter_config.json", check)


BASE_WEIGHT_KEYS = ["base_model.model.model.layers.0.self_attn.q_proj.weight", "base_model.model.lm_head.weight",
                    "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
                    "base_model.model.model.embed_tokens.weight", "lora_A.weight", ""]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.uint8, torch.bool]


@st.composite
def weight_mutations(draw, data: bytes) -> bytes:
    """``data`` (a safetensors file) changed by one drawn mutation."""
    kind = draw(st.sampled_from(["truncate", "header_length", "header_field", "header_bytes", "rename", "extra",
                                 "drop", "dtype", "shape"]))
    (length,) = struct.unpack("<Q", data[:8])
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "header_length":
        return struct.pack("<Q", draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, length + 64)))) + data[8:]
    if kind == "header_bytes":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, 8 + length - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "header_field":
        header = json.loads(data[8:8 + length])
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "<delete>", "__metadata__"]))
        value = draw(st.one_of(VALUES, st.lists(st.integers(-8, 2**20), max_size=3),
                               st.sampled_from(["F16", "I8", "BOOL", "F8_E4M3", "X9"])))
        if field == "<delete>":
            del header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        elif field == "__metadata__":
            header["__metadata__"] = value
        else:
            header[name][field] = value
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + length:]
    tensors = load(data)
    name = draw(st.sampled_from(sorted(tensors)))
    if kind == "rename":
        tensors[draw(st.one_of(st.sampled_from(BASE_WEIGHT_KEYS), st.text(max_size=12)))] = tensors.pop(name)
    elif kind == "extra":
        shape = draw(st.lists(st.integers(0, 40), max_size=2))
        tensors[draw(st.one_of(st.sampled_from(BASE_WEIGHT_KEYS), st.text(max_size=12)))] = torch.ones(shape)
    elif kind == "drop":
        del tensors[name]
    elif kind == "dtype":
        tensors[name] = tensors[name].to(draw(st.sampled_from(DTYPES)))
    else:
        tensors[name] = torch.ones(draw(st.lists(st.integers(0, 40), max_size=3)))
    return save(tensors)


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_files_load_or_name_the_file_and_tensor(adapter_folder, data):
    weights_bytes = (adapter_folder / "adapter_model.safetensors").read_bytes()
    mutated = data.draw(weight_mutations(weights_bytes))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(adapter_folder, Path(tmp) / "adapter"))
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(mutated)

        def check(error: SlimtuneError) -> None:
            message = str(error)
            assert isinstance(error, InvalidFileError) and error.path == str(weights), message
            assert message.startswith(str(weights)), message
            if error.key is not None:
                assert error.key in message or repr(error.key)[1:-1] in message, message
            else:  # a defect of the file as a whole: it says which part and the numbers
                assert any(w in message for w in ("header", "bytes", "JSON")), message

        _load_into_fresh_model(folder, "adapter_model.safetensors", check)


# ---- data files -------------------------------------------------------------------------------------------------
ROW_KEYS = st.sampled_from(["prompt", "response", "instruction", "input", "output", "completion", "messages",
                            "conversations", "system", "text", "role", "content", "from", "value"])
TURN = st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                       st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot"]), VALUES),
                       max_size=3)
ROW_VALUES = st.one_of(st.text(max_size=20), VALUES, st.lists(TURN, max_size=4))
ROWS = st.lists(st.one_of(st.dictionaries(st.one_of(ROW_KEYS, st.text(max_size=5)), ROW_VALUES, max_size=5), VALUES),
                max_size=5)


def _render(rows: list[Any], fmt: str) -> bytes:
    if fmt == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == ".json":
        return json.dumps(rows).encode()
    delimiter = "," if fmt == ".csv" else "\t"
    columns = sorted({str(k) for r in rows if isinstance(r, dict) for k in r}) or ["prompt"]
    lines = [delimiter.join(columns)] + [delimiter.join(str(r.get(c, "")) if isinstance(r, dict) else str(r)
                                                        for c in columns) for r in rows]
    return ("\n".join(lines) + "\n").encode()


@FUZZ
@given(fmt=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]), rows=ROWS,
       damage=st.sampled_from(["none", "invalid_utf8", "mixed", "raw", "empty", "cut"]),
       position=st.integers(0, 10**6), raw=st.binary(max_size=300))
@example(fmt=".jsonl", rows=[{"prompt": "p" * 2**20, "response": "r"}], damage="none", position=0, raw=b"")
@example(fmt=".csv", rows=[{"prompt": "p" * 2**20, "response": "r"}], damage="none", position=0, raw=b"")
@example(fmt=".csv", rows=[{"prompt": "a", "response": "b"}], damage="raw", position=0, raw=b"prompt,response\n\0,x\n")
@example(fmt=".jsonl", rows=[], damage="raw", position=0, raw=b"[" * 100000)
def test_fuzzed_data_files_load_or_name_the_file_and_line(fmt, rows, damage, position, raw):
    content = _render(rows, fmt)
    if damage == "invalid_utf8":
        at = position % (len(content) + 1)
        content = content[:at] + b"\xff\xc3(" + content[at:]
    elif damage == "mixed":  # another format's rows inside this one
        other = _render(rows, ".csv" if fmt in (".jsonl", ".json") else ".jsonl")
        at = content.find(b"\n", position % (len(content) + 1))
        content = content[:at + 1] + other + content[at + 1:] if at >= 0 else content + other
    elif damage == "raw":
        content = raw
    elif damage == "empty":
        content = b""
    elif damage == "cut":
        content = content[:position % (len(content) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{fmt}"
        path.write_bytes(content)

        def check(error: SlimtuneError) -> None:
            message = str(error)
            assert isinstance(error, DataError) and str(path) in message, message
            assert any(w in message for w in ("line ", "item ", "field", "UTF-8", "JSON", "empty", "rows")), message

        outcome("data file", lambda: load_examples(path, split="all"), check)


# ---- checkpoint folders -----------------------------------------------------------------------------------------
def _trainer(run_dir: Path) -> Trainer:
    model = slimtune.add_adapter(tiny_llama(seed=0).train(), slimtune.LoraConfig(r=4, target_modules=["q_proj"],
                                                                                 lora_dropout=0.1))
    settings_ = TrainingSection(max_steps=3, batch_size=2, learning_rate=1e-2, save_every=2, warmup_steps=1)
    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": (ids := torch.randint(3, 128, (6,), generator=g).tolist()), "labels": ids} for _ in range(8)]
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(model, BatchIterator(rows, 2, seed=0, pad_id=0), rows[:2], settings_, run_dir, torch.device("cpu"),
                   0, show_progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fuzz-run")
    assert _trainer(run).train()
    return run / "checkpoints" / "step-000002"


def _json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _json_paths(v, (*prefix, i))
    return out


def _reseal(folder: Path, payload: dict[str, Any], changed: list[str]) -> None:
    """Write ``payload`` with the manifest entries of ``changed`` files and its own checksum recomputed, so the
    change reaches the checks behind the integrity ones."""
    for name in changed:
        data = (folder / name).read_bytes()
        payload["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    payload["checksum"] = _self_digest(payload)
    (folder / STATE_FILE).write_text(json.dumps(payload))


@st.composite
def checkpoint_mutation(draw, folder: Path) -> None:
    """Change the checkpoint copy in ``folder`` in one drawn way."""
    kind = draw(st.sampled_from(["delete", "corrupt", "state", "state_sealed", "tensors_sealed", "manifest_sealed"]))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    payload = json.loads((folder / STATE_FILE).read_text())
    if kind == "delete":
        (folder / draw(st.sampled_from(files))).unlink()
    elif kind == "corrupt":
        target = folder / draw(st.sampled_from(files))
        data = bytearray(target.read_bytes())
        if draw(st.booleans()) and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        else:
            data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
        target.write_bytes(bytes(data))
    elif kind in ("state", "state_sealed"):
        path = draw(st.sampled_from(_json_paths(payload)[1:]))
        node = payload
        for part in path[:-1]:
            node = node[part]
        if draw(st.booleans()) and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = draw(VALUES)
        if kind == "state_sealed":
            _reseal(folder, payload, [])
        else:
            (folder / STATE_FILE).write_text(json.dumps(payload))
    elif kind == "tensors_sealed":
        tensors = load((folder / TENSORS_FILE).read_bytes())
        name = draw(st.sampled_from(sorted(tensors)))
        action = draw(st.sampled_from(["drop", "rename", "shape", "dtype", "extra"]))
        if action == "drop":
            del tensors[name]
        elif action == "rename":
            tensors[draw(st.sampled_from(["model/x", "method/y", "optimizer/state/0/exp_avg", "rng/torch"]))] = \
                tensors.pop(name)
        elif action == "shape":
            tensors[name] = torch.zeros(draw(st.lists(st.integers(0, 9), max_size=3)), dtype=tensors[name].dtype)
        elif action == "dtype":
            tensors[name] = tensors[name].to(draw(st.sampled_from(DTYPES + [torch.float32])))
        else:
            tensors[draw(st.sampled_from(["model/base_model.model.lm_head.weight", "model/new", "method/x"]))] = \
                torch.zeros(2)
        (folder / TENSORS_FILE).write_bytes(save(tensors))
        _reseal(folder, payload, [TENSORS_FILE])
    else:
        name = draw(st.sampled_from(sorted(payload["files"])))
        entry = payload["files"].pop(name)
        new_name = draw(st.sampled_from(["../../outside", "/etc/passwd", "adapter/../tensors.safetensors", "", name,
                                         "missing.bin"]))
        payload["files"][new_name] = draw(st.one_of(st.just(entry), VALUES))
        _reseal(folder, payload, [])


def _optimizer_state(trainer: Trainer) -> list[tuple[str, Any]]:
    flat: list[tuple[str, Any]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        else:
            flat.append((where, value.clone() if isinstance(value, torch.Tensor) else value))

    walk(trainer.optimizer.state_dict(), "optimizer")
    walk(trainer.scheduler.state_dict(), "scheduler")
    return flat


def _same(a: list[tuple[str, Any]], b: list[tuple[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        ka == kb and (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb)
        for (ka, va), (kb, vb) in zip(a, b))


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoints_resume_or_name_the_file_and_key(checkpoint_folder, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(checkpoint_folder, Path(tmp) / "step-000002"))
        data.draw(checkpoint_mutation(folder))
        trainer = _trainer(Path(tmp) / "run")
        before, optimizer_before, rng_before = snapshot(trainer.model), _optimizer_state(trainer), torch.get_rng_state()

        def check(error: SlimtuneError) -> None:
            message = str(error)
            assert isinstance(error, InvalidFileError) and str(folder) in message, message
            if error.key is not None:
                assert error.key in message or repr(error.key)[1:-1] in message, message
            else:  # the file as a whole: unreadable JSON, missing, cut
                assert any(w in message for w in ("JSON", "missing", "bytes", "header", "pickle")), message

        def resume() -> None:
            read_checkpoint(folder).apply(trainer.model, trainer.optimizer, trainer.scheduler)

        if outcome("checkpoint folder", resume, check) is not None:
            assert_unchanged(trainer.model, before)
            assert _same(_optimizer_state(trainer), optimizer_before)
            assert torch.equal(torch.get_rng_state(), rng_before)


def _sealed_copy(checkpoint_folder: Path, tmp: str, change: Callable[[dict[str, Any]], None]) -> Path:
    folder = Path(shutil.copytree(checkpoint_folder, Path(tmp) / "step-000002"))
    payload = json.loads((folder / STATE_FILE).read_text())
    change(payload)
    _reseal(folder, payload, [])
    return folder


def test_a_setting_of_the_wrong_kind_is_refused_before_it_loads(checkpoint_folder):
    with tempfile.TemporaryDirectory() as tmp:
        folder = _sealed_copy(checkpoint_folder, tmp,
                              lambda p: p["optimizer"]["param_groups"][0].update(lr="fast"))
        trainer = _trainer(Path(tmp) / "run")
        optimizer_before = _optimizer_state(trainer)
        with pytest.raises(InvalidFileError, match=r"optimizer\.param_groups\[0\]\.lr='fast' is a str, this run's is a "
                                                   "number"):
            read_checkpoint(folder).apply(trainer.model, trainer.optimizer, trainer.scheduler)
        assert _same(_optimizer_state(trainer), optimizer_before)


def test_a_scheduler_state_that_fails_to_load_leaves_the_optimizer_as_it_was(checkpoint_folder):
    with tempfile.TemporaryDirectory() as tmp:
        folder = _sealed_copy(checkpoint_folder, tmp, lambda p: None)
        trainer = _trainer(Path(tmp) / "run")
        before, optimizer_before = snapshot(trainer.model), _optimizer_state(trainer)

        class Refusing(type(trainer.scheduler)):  # a scheduler whose own checks refuse the state (after the
            refused = False                       # optimizer's has loaded)

            def load_state_dict(self, state):
                if not Refusing.refused:
                    Refusing.refused = True
                    raise ValueError("this scheduler refuses the state")
                super().load_state_dict(state)

        trainer.scheduler.__class__ = Refusing
        with pytest.raises(InvalidFileError, match=r"trainer_state\.json: optimizer/scheduler state does not load"):
            read_checkpoint(folder).apply(trainer.model, trainer.optimizer, trainer.scheduler)
        assert _same(_optimizer_state(trainer), optimizer_before)
        assert_unchanged(trainer.model, before)


def test_a_distributed_runs_checkpoint_read_by_one_process_says_how_to_resume_it(checkpoint_folder):
    # it said "the checkpoint is damaged. Delete this step's folder": every step's folder, one after another
    with tempfile.TemporaryDirectory() as tmp:
        folder = _sealed_copy(checkpoint_folder, tmp,
                              lambda p: p.update(distributed={"world_size": 2, "strategy": "ddp"}))
        with pytest.raises(ValueError, match=r"written by a distributed run .* --resume --nproc-per-node N"):
            read_checkpoint(folder)
