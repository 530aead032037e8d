"""Every shipped recipe loads, validates and dry-runs offline; the method recipes cover every method family.

The dry run (slimtune.train.dry_run) resolves each model's config without downloading (a socket that
connects is a failure here), adds the method to a meta-device copy of the model, checks the data source
and estimates memory, and must not create the run folder.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from slimtune.cli import main
from slimtune.methods.lora import LoraConfig
from slimtune.train.dry_run import dry_run
from slimtune.train.recipe import RecipeError, list_recipes, load_recipe, recipe_from_dict, recipe_summary
from slimtune.train.run_folder import RunFolder

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("method_recipes", ROOT / "bench" / "method_recipes.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

RECIPES = list_recipes()
# The big-model recipes: (name fragment, hub id, parameters in billions as the config gives them).
BIG = {"llama31-8b": ("meta-llama/Llama-3.1-8B-Instruct", 8.03), "qwen25-7b": ("Qwen/Qwen2.5-7B-Instruct", 7.62),
       "mistral-7b": ("mistralai/Mistral-7B-Instruct-v0.3", 7.25)}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt (a download) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run tried to connect: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates_and_dry_runs(path, tmp_path):
    text = path.read_text()
    assert f"Run: slimtune train {path.stem}\n" in text, f"{path.name}: the header needs '# Run: slimtune train NAME'"
    description, command = recipe_summary(path)
    assert description and command == f"slimtune train {path.stem}"
    recipe = load_recipe(path, [f"output.dir={tmp_path / 'run'}"])
    assert recipe.name == path.stem and recipe_from_dict(recipe.to_dict(), name=recipe.name) == recipe
    big = next((short for short in BIG if f"-{short}-" in path.stem), None)
    try:  # the 7-8B recipes are for one GPU: estimated on an H100 (on this CPU they would not fit, and advice runs)
        report = dry_run(recipe, device="h100" if big else None)
    except RecipeError as error:  # only a recipe that builds on another shipped recipe's run may stop here
        needs = [p.stem for p in RECIPES if f"runs/{p.stem}/" in str(error)]
        assert needs and "does not exist" in str(error), str(error)
        return
    assert report.trainable > 0 and report.estimate.peak > 0
    text = str(report)
    assert text.startswith(f"dry run of {path.stem}: the recipe is valid") and "peak while training" in text
    assert not (tmp_path / "run").exists()  # nothing written
    if big:
        hub_id, billions = BIG[big]
        assert recipe.model.name_or_path == hub_id and recipe.model.dtype == "bfloat16"
        assert (recipe.quantization is not None) == path.stem.startswith("qlora-") and isinstance(recipe.method,
                                                                                                  LoraConfig)
        assert report.shape.params / 1e9 == pytest.approx(billions, abs=0.01)
        assert hub_id in report.shape.source  # slimtune's table or the Hugging Face cache: no download
        assert report.trainable > 20_000_000 and report.estimate.fits  # r=16 on every linear layer; fits an H100


def test_the_recipes_command_lists_every_shipped_recipe(capsys):
    files = sorted((ROOT / "src" / "slimtune" / "recipes").glob("*.yaml"))
    assert [p.stem for p in files] == [p.stem for p in RECIPES] and len(files) >= 25
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for path in files:
        assert f"run: slimtune train {path.stem}\n" in out, path.stem


def test_every_big_model_has_a_lora_and_a_qlora_recipe():
    names = {p.stem for p in RECIPES}
    assert {f"{kind}-{short}-pycode" for kind in ("lora", "qlora") for short in BIG} <= names


def test_method_recipes_cover_every_family():
    by_name = {recipe: load_recipe(recipe) for _, recipe, _ in bench.METHOD_RECIPES}
    assert set(by_name) <= {p.stem for p in RECIPES}
    kinds = set()
    for name, r in by_name.items():
        kinds.add(r.method.peft_type)
        if isinstance(r.method, LoraConfig) and r.method.use_dora:
            kinds.add("DORA")
        if r.training.loraplus_lr_ratio:
            kinds.add("LORA_PLUS")
        if r.training.layerwise_lr_decay:
            kinds.add("LAYERWISE_LR")
        if r.quantization is not None:
            kinds.add("QLORA")
        assert r.model.name_or_path == "default", name
        assert r.data.dataset.startswith("pycode") or "pycode-alpaca" in r.data.dataset, name
    assert kinds >= {"LORA", "QLORA", "DORA", "LORA_FA", "VERA", "DELTA_LORA", "LORA_PLUS", "LOHA", "LOKR", "IA3",
                     "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "BOTTLENECK", "SELECTIVE", "LAYERWISE_LR"}
    assert any("LayerDrop" in note for note in bench.NOTES)  # the one family without a recipe says why


def test_the_bench_table_and_readme_block(tmp_path):
    results = {"dora-smollm2-pycode": {"trainable_params": 5_040_000, "total_params": 139_555_008,
                                       "adapter_bytes": 20_200_000, "eval_loss_before": 1.5, "eval_loss_after": 1.2,
                                       "process_seconds": 95.4, "peak_memory_mb": 1900.0},
               "vera-smollm2-pycode": {"failed": 1, "log": "/x/vera-smollm2-pycode.log"}}
    table = bench.table(results)
    assert "| DoRA | `dora-smollm2-pycode` | 5,040,000 (3.611%) | 19.3 MiB | 1.5000 → 1.2000 | 1m35s | 1.86 GiB |" \
        in table
    assert "| VeRA | `vera-smollm2-pycode` | failed (exit 1, see vera-smollm2-pycode.log)" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.BEGIN}\nold\n{bench.END}\nrest\n")
    bench.write_readme(readme, table)
    assert readme.read_text() == f"intro\n{bench.BEGIN}\n{table}\n{bench.END}\nrest\n"


def test_a_dry_run_names_the_problem(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    base = ["model.name_or_path=meta-llama/Llama-3.1-8B-Instruct", f"output.dir={tmp_path / 'run'}",
            f"data.dataset={data}"]
    with pytest.raises(RecipeError, match=r"^method: .*target_modules.*nope"):
        dry_run(load_recipe("lora-llama31-8b-pycode", [*base, "method.target_modules=[nope]"]))
    with pytest.raises(RecipeError, match=r"^model.name_or_path: model 'someone/unknown-7b': no local folder"):
        dry_run(load_recipe("lora-llama31-8b-pycode", [*base, "model.name_or_path=someone/unknown-7b"]))
    with pytest.raises(RecipeError, match=r"^data.dataset: Dataset '.*missing.jsonl' does not exist"):
        dry_run(load_recipe("lora-llama31-8b-pycode", [*base, f"data.dataset={tmp_path / 'missing.jsonl'}"]))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    (tmp_path / "run" / "recipe.yaml").write_text(f"{RunFolder.RECIPE_MARK}\n")  # a run's folder
    with pytest.raises(RecipeError, match="holds a finished run"):
        dry_run(load_recipe("lora-llama31-8b-pycode", base))
    report = dry_run(load_recipe("lora-llama31-8b-pycode", [*base, "output.overwrite=true"]))
    assert f"data     {data} (33 bytes)" in str(report)


# The multi-GPU recipes (issue 14): a `distributed` section; validated offline like the others, sized for an H100.
DISTRIBUTED = {"qlora-llama3-8b-fsdp": "fsdp", "lora-llama3-8b-ddp": "ddp"}


@pytest.mark.parametrize("name", sorted(DISTRIBUTED))
def test_the_distributed_recipes_validate_offline(name, tmp_path, capsys):
    recipe = load_recipe(name, [f"output.dir={tmp_path / 'run'}"])
    assert recipe.distributed is not None and recipe.distributed.strategy == DISTRIBUTED[name]
    assert (recipe.quantization is not None) == name.startswith("qlora-")
    report = dry_run(recipe, device="h100")
    assert report.trainable > 20_000_000 and report.estimate.fits
    assert main(["train", name, "--dry-run", f"output.dir={tmp_path / 'run'}"]) == 0
    assert f"strategy: {DISTRIBUTED[name]}" in capsys.readouterr().out and not (tmp_path / "run").exists()
