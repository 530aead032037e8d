"""Run every method recipe (one per PEFT family, all on SmolLM2-135M-Instruct with pycode) and write the table.

Each recipe runs in its own process, exactly as a user runs it (`slimtune train NAME output.dir=...
output.overwrite=true`); the figures come from each run's summary.json: trainable parameters, adapter size on
disk, held-out loss before → after, wall time end to end, peak memory while training (peak RSS on a CPU,
max allocated on a GPU). The markdown table replaces the README's between the method-recipes markers.

Run on a quiet machine (the figures are wall times; ~30-40 minutes on 2 CPU cores for all of them):

    .venv/bin/python bench/method_recipes.py                      # every recipe, then README.md's table
    .venv/bin/python bench/method_recipes.py --only dora-smollm2-pycode ia3-smollm2-pycode --no-readme
    .venv/bin/python bench/method_recipes.py --table-only         # rebuild the table from the last runs

A quick smoke run (not for the table): add e.g. ``-- training.max_steps=2 data.max_train_examples=8
data.max_eval_examples=4`` (overrides after ``--`` go to every recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- method-recipes:begin -->", "<!-- method-recipes:end -->"
# (method, recipe, overrides): every method family of slimtune, on the default model.
METHOD_RECIPES: list[tuple[str, str, list[str]]] = [
    # the plain LoRA recipe trains one packed epoch (hours on a CPU): here it runs at the others' size
    ("LoRA", "lora-smollm2-pycode", ["training.max_steps=40", "training.batch_size=1", "training.learning_rate=5e-4",
                                     "training.gradient_accumulation_steps=1", "training.warmup_steps=4",
                                     "training.eval_every=0", "training.save_every=0", "data.max_seq_length=256",
                                     "data.packing=false", "data.max_eval_examples=16",
                                     "model.gradient_checkpointing=false", "demo.enabled=false"]),
    ("QLoRA (NF4 + double quant)", "qlora-smollm2-pycode", ["demo.enabled=false"]),
    ("DoRA", "dora-smollm2-pycode", []),
    ("LoRA-FA", "lora-fa-smollm2-pycode", []),
    ("VeRA", "vera-smollm2-pycode", []),
    ("Delta-LoRA", "delta-lora-smollm2-pycode", []),
    ("LoRA+", "loraplus-smollm2-pycode", []),
    ("LoHa", "loha-smollm2-pycode", []),
    ("LoKr", "lokr-smollm2-pycode", []),
    ("(IA)³", "ia3-smollm2-pycode", []),
    ("prompt tuning", "prompt-tuning-smollm2-pycode", []),
    ("P-tuning", "p-tuning-smollm2-pycode", []),
    ("prefix tuning", "prefix-tuning-smollm2-pycode", []),
    ("bottleneck adapters (Houlsby)", "bottleneck-smollm2-pycode", []),
    ("selective (BitFit-style sparse)", "selective-smollm2-pycode", []),
    ("LoRA + layer-wise LR decay", "layerwise-lr-smollm2-pycode", []),
    ("Ludwig config (QLoRA)", "ludwig-smollm2-pycode", []),
]
NOTES = [
    "LayerDrop has no recipe: a recipe holds one method, and LayerDrop adds no parameters to train. Use it beside "
    "another adapter from Python (`slimtune.apply_layerdrop(model, 0.1)` after `add_adapter`); "
    "`bench/compare_methods.py` measures LoRA + LayerDrop.",
    "BitFit trains biases, and SmolLM2 (like every llama) has none: the sparse family's recipe is SELECTIVE.",
]


def run_one(recipe: str, out: Path, overrides: list[str], log_dir: Path) -> dict:
    """Train ``recipe`` in a subprocess; its summary.json plus the measured wall time (or the failure)."""
    run_dir = out / recipe
    cmd = [sys.executable, "-c", "import sys; from slimtune.cli import main; sys.exit(main())", "train", recipe,
           f"output.dir={run_dir}", "output.overwrite=true", *overrides, "--no-progress"]
    log = log_dir / f"{recipe}.log"
    started = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy()).returncode
    wall = time.perf_counter() - started
    summary_file = run_dir / "summary.json"
    if rc != 0 or not summary_file.is_file():
        return {"recipe": recipe, "failed": rc, "log": str(log), "process_seconds": wall}
    return {"recipe": recipe, **json.loads(summary_file.read_text()), "process_seconds": wall}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(results: dict[str, dict]) -> str:
    lines = ["| method | recipe | trainable params | adapter size | eval loss before → after | wall time "
             "| peak memory |", "|---|---|---|---|---|---|---|"]
    for method, recipe, _ in METHOD_RECIPES:
        r = results.get(recipe)
        name = f"`{recipe}`" + (" (shortened, see the bench)" if recipe == "lora-smollm2-pycode" else "")
        if r is None:
            lines.append(f"| {method} | {name} | not run | | | | |")
        elif "failed" in r:
            lines.append(f"| {method} | {name} | failed (exit {r['failed']}, see {Path(r['log']).name}) | | | | |")
        else:
            pct = 100 * r["trainable_params"] / r["total_params"]
            minutes, seconds = divmod(round(r["process_seconds"]), 60)
            lines.append(f"| {method} | {name} | {r['trainable_params']:,} ({pct:.3f}%) | "
                         f"{human_bytes(r['adapter_bytes'])} | {r['eval_loss_before']:.4f} → "
                         f"{r['eval_loss_after']:.4f} | {minutes}m{seconds:02d}s | "
                         f"{r['peak_memory_mb'] / 1024:.2f} GiB |")
    return "\n".join(lines + [""] + [f"- {note}" for note in NOTES])


def write_readme(readme: Path, text: str) -> None:
    content = readme.read_text(encoding="utf-8")
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block to replace.")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "method-recipes", help="where the runs go")
    parser.add_argument("--only", nargs="+", metavar="RECIPE", help="run these recipes only (others keep their "
                                                                     "last results)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--no-readme", action="store_true", help="print the table, leave the README alone")
    parser.add_argument("--table-only", action="store_true", help="run nothing: rebuild the table from --out")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (after --)")
    args = parser.parse_args()
    known = [recipe for _, recipe, _ in METHOD_RECIPES]
    unknown = sorted(set(args.only or []) - set(known))
    if unknown:
        raise SystemExit(f"--only {unknown}: not method recipes; they are {known}")
    args.out.mkdir(parents=True, exist_ok=True)
    # a smoke run (overrides given) keeps its figures apart: the README table is rebuilt from results.json only
    results_file = args.out / ("smoke-results.json" if args.overrides else "results.json")
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not args.table_only:
        for method, recipe, overrides in METHOD_RECIPES:
            if args.only and recipe not in args.only:
                continue
            print(f"{method}: slimtune train {recipe} ...", flush=True)
            results[recipe] = run_one(recipe, args.out, [*overrides, *args.overrides], args.out)
            r = results[recipe]
            print("  failed, see " + r["log"] if "failed" in r else
                  f"  eval {r['eval_loss_before']:.4f} -> {r['eval_loss_after']:.4f}, {r['process_seconds']:.0f} s",
                  flush=True)
            results_file.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    print(text)
    if not args.no_readme and not args.overrides:
        write_readme(args.readme, text)
        print(f"table written to {args.readme}")
    elif args.overrides:
        print("(overrides given: a smoke run, the README is left alone)")


if __name__ == "__main__":
    main()
