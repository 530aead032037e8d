"""A tiny, offline `slimtune train` setup: a saved tiny LLaMA + tokenizer, JSONL data, a recipe dict.

The model folder is built once per test process (a second or so) and shared; every test writes its
runs under its own ``tmp_path``.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from train_helpers import make_tokenizer, tiny_llama

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]


def rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """Learnable prompt → response pairs: the response repeats the prompt's word twice."""
    out = []
    for i in range(offset, offset + n):
        word = WORDS[i % len(WORDS)] + str(i // len(WORDS))
        out.append({"prompt": f"Repeat {word} twice.", "response": f"{word} {word}"})
    return out


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@functools.lru_cache(maxsize=1)
def tiny_model_dir() -> Path:
    """A folder with a tiny LLaMA (safetensors) and its ChatML tokenizer, as `save_pretrained` writes them."""
    root = Path(tempfile.mkdtemp(prefix="slimtune-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    tokenizer = make_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def tiny_recipe(tmp: Path, quantized: bool = True, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict training the tiny model for a few steps; ``sections`` update the defaults."""
    train = write_jsonl(tmp / "train.jsonl", rows(40))
    evals = write_jsonl(tmp / "eval.jsonl", rows(8, offset=40))
    recipe: dict[str, Any] = {
        "description": "tiny test recipe",
        "model": {"name_or_path": str(tiny_model_dir()), "device": "cpu"},
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "blocksize": 64} if quantized else None,
        "method": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"},
        "data": {"dataset": str(train), "eval_dataset": str(evals), "max_seq_length": 48},
        "training": {"max_steps": 8, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
                     "warmup_steps": 2, "save_every": 3, "seed": 0},
        "output": {"dir": str(tmp / "run")},
        "demo": {"enabled": True, "max_new_tokens": 6},
    }
    for key, values in sections.items():
        recipe[key] = None if values is None else {**(recipe.get(key) or {}), **values}
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
