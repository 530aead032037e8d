"""kill -9 at any instant, then resume: the run always goes on (or says clearly why it cannot), and its final
adapter equals an uninterrupted run's bit for bit.

Two tiny runs (4 steps, a checkpoint after each, the last 2 kept): QLoRA (NF4 base, LoRA with dropout plus a
trained copy of lm_head, 8-bit AdamW) and Delta-LoRA (a float base it moves in place, paged AdamW). Each
trial starts a fresh run folder and kills it one to three times at seeded instants (see crash.py: at a
random time, or just before a random write call, which lands in checkpoint writes, the final adapter
save, checkpoint pruning, the lock and the recipe/summary writes), resuming with ``--resume`` after each
kill; a refusal must be one of the expected, explained ones, and its advice is followed. The default suite
kills ``SLIMTUNE_KILLS`` (20) times from seed ``SLIMTUNE_KILL_SEED`` (0); more, e.g.:

    SLIMTUNE_KILLS=200 .venv/bin/python -m pytest -q -s -p no:randomly tests/reliability/test_crash.py

``SLIMTUNE_RELIABILITY_REPORT=<file>`` appends the tally as a JSON line.
"""

from __future__ import annotations

import json
import os
import random

from crash import Tally, report, timed
from run_helpers import tiny_model_dir, tiny_recipe, write_recipe

KILLS = int(os.environ.get("SLIMTUNE_KILLS", "20"))
SEED = int(os.environ.get("SLIMTUNE_KILL_SEED", "0"))
# The refusals a killed run may answer with, and what the user does next (as the message says).
EXPECTED_REFUSALS = {"already holds a run": "restart", "already finished": "done"}
RUNS = {
    "qlora": {"method": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                         "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
              "training": {"optim": "adamw_8bit"}},
    "delta_lora": {"method": {"peft_type": "DELTA_LORA", "r": 4, "lora_alpha": 8, "delta_start_step": 1,
                              "target_modules": ["q_proj", "v_proj", "down_proj"]},
                   "training": {"optim": "paged_adamw"}, "quantization": None},
}


def recipe_file(tmp_path, kind: str, run_dir):
    spec = RUNS[kind]
    recipe = tiny_recipe(tmp_path, quantized="quantization" not in spec,
                         training={"max_steps": 4, "save_every": 1, "keep_checkpoints": 2, "eval_batch_size": 8,
                                   **spec["training"]},
                         demo={"enabled": False}, output={"dir": str(run_dir), "plot": False})
    recipe["method"] = spec["method"]
    return write_recipe(tmp_path / f"{kind}-{run_dir.name}.yaml", recipe)


def adapter_bytes(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "adapter").iterdir())}


def train_argv(recipe, *extra: str) -> list[str]:
    return ["train", str(recipe), "--no-progress", *extra]


def reference(tmp_path, kind: str, tally: Tally):
    """An uninterrupted run: its adapter, how long it took and how many write calls it made."""
    run_dir = tmp_path / f"{kind}-reference"
    result = timed(tally, train_argv(recipe_file(tmp_path, kind, run_dir)), tmp_path)
    assert result.exitcode == 0, result.output
    return adapter_bytes(run_dir), tally.seconds, result.io_calls


def trial(tmp_path, kind: str, index: int, rng: random.Random, kills: int, ref, tally: Tally) -> int:
    """A fresh run killed ``kills`` times and resumed after each; returns the kills that happened."""
    expected, seconds, io_calls = ref
    run_dir = tmp_path / f"{kind}-{index}"
    recipe = recipe_file(tmp_path, kind, run_dir)
    argv, done, happened = train_argv(recipe), False, 0
    for attempt_no in range(kills + 6):
        plan = {}
        if happened < kills and attempt_no < kills + 3:
            if rng.random() < 0.5:
                plan = {"kill_after": rng.uniform(0.0, seconds)}
            else:
                plan = {"kill_at": rng.randint(1, io_calls)}
        result = timed(tally, argv, tmp_path, **plan)
        if result.killed:
            happened += 1
            tally.kill(result.phase or "?")
            argv = train_argv(recipe, "--resume")
            continue
        if result.exitcode == 0:
            done = True
            break
        reason = next((r for r in EXPECTED_REFUSALS if r in result.error), None)
        assert result.exitcode == 2 and reason, f"unexpected end ({result.exitcode}):\n{result.output}"
        tally.refused(reason)
        if EXPECTED_REFUSALS[reason] == "done":
            done = True
            break
        argv = train_argv(recipe, "output.overwrite=true")  # what the message advises
    assert done, f"{kind} trial {index} did not finish"
    assert (run_dir / "summary.json").is_file()
    assert not [p.name for p in run_dir.rglob(".*") if ".new-" in p.name or ".old-" in p.name], "leftovers"
    tally.runs_compared += 1
    got = adapter_bytes(run_dir)
    assert got == expected, f"{kind} trial {index}: the final adapter differs from the uninterrupted run's"
    tally.identical += 1
    return happened


def test_sigkill_at_random_instants_then_resume_gives_the_identical_adapter(tmp_path):
    tiny_model_dir()  # built once, before the children fork
    tally = Tally()
    references = {kind: reference(tmp_path, kind, tally) for kind in RUNS}
    rng = random.Random(SEED)
    index = 0
    while tally.kills < KILLS:
        kind = list(RUNS)[index % len(RUNS)]
        trial(tmp_path, kind, index, rng, rng.randint(1, 3), references[kind], tally)
        index += 1
    assert tally.identical == tally.runs_compared
    assert tally.phases.get("checkpoint write", 0) > 0  # the seeded kills do land inside checkpoint writes
    summary = {"suite": "crash", "seed": SEED, "kills": tally.kills, "phases": tally.phases,
               "refusals": tally.refusals, "runs_compared": tally.runs_compared, "identical": tally.identical,
               "attempts": tally.attempts, "child_seconds": round(tally.seconds, 1)}
    print(json.dumps(summary))
    report(summary)

