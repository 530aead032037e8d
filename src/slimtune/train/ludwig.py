"""Ludwig's declarative LLM config (``model_type: llm``) read as a slimtune recipe.

`slimtune train ludwig.yaml` accepts the config that ``ludwig train --config`` takes for an LLM, with its
key names and Ludwig's defaults (checked against Ludwig 0.11's schema, ``ludwig/schema/``), mapped onto
slimtune's sections:

==========================================  =======================================================
Ludwig                                      slimtune
==========================================  =======================================================
``base_model`` (a hub id, folder or preset)  ``model.name_or_path``
``input_features`` / ``output_features``     one text feature each: the prompt column, the answer column
``prompt.template`` (``{column}``,           the user turn, rendered per row (a ``DatasetView``; the
``{__sample__}``, ``{__task__}``)             model's chat template still wraps it, as at inference)
``preprocessing.global_max_sequence_length``  ``data.max_seq_length`` (else the two features'
                                             ``max_sequence_length`` added up)
``preprocessing.sample_size``                ``data.max_train_examples``
``adapter: {type: lora, r, alpha, dropout,    ``method`` LORA (alpha defaults to 2·r, dropout 0.05, as
target_modules, use_rslora, use_dora,         in Ludwig); ``type: ia3`` → IA3
bias_type}``
``quantization: {bits: 4|8, ...}``           ``quantization`` (nf4 + double quant by default)
``trainer: {type: finetune, learning_rate,    ``training`` (``train_steps`` → ``max_steps``,
batch_size, eval_batch_size, epochs,          ``warmup_fraction`` → ``warmup_ratio``,
train_steps, gradient_accumulation_steps,     ``clipglobalnorm`` → ``max_grad_norm``, default 0.5;
learning_rate_scheduler, optimizer,           ``steps_per_checkpoint`` → ``save_every``)
gradient_clipping, steps_per_checkpoint,
enable_gradient_checkpointing}``
``generation.max_new_tokens``                ``demo.max_new_tokens``
==========================================  =======================================================

Ludwig takes the dataset on its command line (``--dataset``); here it is ``data.dataset`` (in the file
or as an override ``data.dataset=train.csv``). slimtune's own sections (``description``, ``model``,
``data``, ``training``, ``output``, ``demo``) may sit beside Ludwig's keys and win over what those map
to. Every key slimtune cannot honour is named, with the reason, in one :class:`RecipeError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from slimtune.train.schema import RecipeError

LUDWIG_KEYS = ("model_type", "base_model", "input_features", "output_features", "prompt", "adapter", "quantization",
               "trainer", "generation", "preprocessing", "backend", "model_parameters", "defaults", "hyperopt",
               "ludwig_version")
SLIMTUNE_SECTIONS = ("description", "model", "data", "training", "output", "demo", "distributed")
# Ludwig's base_model presets (ludwig/schema/llms/base_model.py, MODEL_PRESETS), a subset: the causal LMs.
PRESETS = {
    "codellama-7b": "codellama/CodeLlama-7b-hf", "codellama-7b-instruct": "codellama/CodeLlama-7b-instruct-hf",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf", "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1", "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.1",
    "zephyr-7b-beta": "HuggingFaceH4/zephyr-7b-beta", "phi-2": "microsoft/phi-2",
}
OPTIMIZERS = {"adam": "adamw", "adamw": "adamw", "adam_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit",
              "paged_adam": "paged_adamw", "paged_adamw": "paged_adamw", "paged_adam_8bit": "paged_adamw_8bit",
              "paged_adamw_8bit": "paged_adamw_8bit"}  # Adam with weight_decay 0 is AdamW


def is_ludwig_config(data: Any) -> bool:
    """Whether a parsed recipe is Ludwig's schema (it has ``model_type``, ``base_model`` or features)."""
    return isinstance(data, dict) and any(k in data for k in ("model_type", "base_model", "input_features",
                                                              "output_features"))


class _Mapper:
    """Walks a Ludwig config, filling slimtune sections and collecting what cannot be honoured."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.problems: list[str] = []
        self.out: dict[str, dict[str, Any]] = {k: {} for k in ("model", "method", "data", "training", "demo")}
        self.quantization: dict[str, Any] | None = None

    def refuse(self, key: str, value: Any, why: str) -> None:
        self.problems.append(f"{key} = {value!r}: {why}")

    def section(self, key: str) -> dict[str, Any]:
        value = self.config.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.refuse(key, value, "expected a mapping")
            return {}
        return value

    def keys(self, where: str, section: dict[str, Any], handlers: dict[str, Callable[[Any], None]],
             harmless: dict[str, Any] | None = None) -> None:
        """Run the handler of each key present; a key without one is refused unless it has its harmless value."""
        for key, value in section.items():
            if key in handlers:
                handlers[key](value)
            elif harmless is not None and key in harmless and value == harmless[key]:
                continue
            else:
                self.refuse(f"{where}.{key}", value, "no slimtune equivalent")

    def set(self, section: str, key: str) -> Callable[[Any], None]:
        return lambda value: self.out[section].__setitem__(key, value)

    # ---- the sections ------------------------------------------------------------------------------
    def top(self) -> None:
        cfg = self.config
        if cfg.get("model_type", "llm") != "llm":
            self.refuse("model_type", cfg["model_type"], "slimtune fine-tunes LLMs (model_type: llm) only")
        if cfg.get("base_model") is None:
            self.refuse("base_model", None, "required: a hub id, a local folder, or 'default' (SmolLM2-135M)")
        else:
            self.out["model"]["name_or_path"] = PRESETS.get(cfg["base_model"], cfg["base_model"])
        for key in ("model_parameters", "defaults", "hyperopt"):
            if cfg.get(key):
                self.refuse(key, cfg[key], "no slimtune equivalent")
        backend = self.section("backend")
        if backend.get("type", "local") != "local" or set(backend) - {"type"}:
            self.refuse("backend", backend, "slimtune runs locally (torchrun for several GPUs)")

    def feature(self, kind: str) -> tuple[str, int | None]:
        """(column, max_sequence_length) of the one text feature of ``input_features`` / ``output_features``."""
        features = self.config.get(kind)
        if not isinstance(features, list) or len(features) != 1 or not isinstance(features[0], dict):
            self.refuse(kind, features, "an LLM config has exactly one text feature here, e.g. [{name: output, "
                                        "type: text}]")
            return "", None
        feature, where = features[0], f"{kind}[0]"
        if feature.get("type", "text") != "text":
            self.refuse(f"{where}.type", feature["type"], "LLM features are text")
        preprocessing = feature.get("preprocessing") or {}
        for key, value in preprocessing.items():
            if key != "max_sequence_length":
                self.refuse(f"{where}.preprocessing.{key}", value, "no slimtune equivalent")
        defaults = {"type": "text", "active": True, "tied": None, "encoder": {"type": "passthrough"},
                    "decoder": {"type": "text_extractor"}, "loss": {"type": "next_token_softmax_cross_entropy"}}
        for key, value in feature.items():
            if key not in ("name", "column", "preprocessing", "type") and defaults.get(key, object()) != value:
                self.refuse(f"{where}.{key}", value, "no slimtune equivalent")
        return str(feature.get("column") or feature.get("name") or ""), preprocessing.get("max_sequence_length")

    def prompt(self, column: str) -> str:
        """The prompt template as a format string over the row's columns."""
        prompt = self.section("prompt")
        template, task = prompt.get("template"), prompt.get("task")
        if prompt.get("retrieval"):
            self.refuse("prompt.retrieval", prompt["retrieval"], "no retrieval (few-shot examples) in slimtune")
        for key in set(prompt) - {"template", "task", "retrieval"}:
            self.refuse(f"prompt.{key}", prompt[key], "no slimtune equivalent")
        if template is None:
            if task is not None:
                self.refuse("prompt.task", task, "Ludwig's built-in task template is not reproduced; write "
                                                 "prompt.template with {__task__} and {__sample__}")
            return "{" + column + "}"
        if task is not None and "{__task__}" not in template:
            self.refuse("prompt.task", task, "the template has no {__task__} to put it in")
        escaped = str(task or "").replace("{", "{{").replace("}", "}}")
        return str(template).replace("{__sample__}", "{" + column + "}").replace("{__task__}", escaped)

    def adapter(self) -> None:
        adapter, method = self.config.get("adapter"), self.out["method"]
        if not isinstance(adapter, dict):
            self.refuse("adapter", adapter, "slimtune trains adapters, not the full model; add adapter: {type: lora}")
            return
        kind = adapter.get("type", "lora")
        harmless = {"type": kind, "pretrained_adapter_weights": None}

        def postprocessor(value: Any) -> None:
            if (value or {}).get("merge_adapter_into_base_model"):
                self.refuse("adapter.postprocessor.merge_adapter_into_base_model", True,
                            "training saves the adapter; merge it afterwards with `slimtune merge --adapter ...`")
        if kind == "lora":
            r = adapter.get("r", 8)
            method.update(peft_type="LORA", r=r, lora_alpha=adapter.get("alpha") or 2 * r, lora_dropout=0.05)
            self.keys("adapter", adapter, {
                "r": lambda v: None, "alpha": lambda v: None, "dropout": lambda v: method.update(lora_dropout=v),
                "target_modules": lambda v: method.update(target_modules=v),
                "use_rslora": lambda v: method.update(use_rslora=v), "use_dora": lambda v: method.update(use_dora=v),
                "bias_type": lambda v: method.update(bias=v), "postprocessor": postprocessor}, harmless)
        elif kind == "ia3":
            method["peft_type"] = "IA3"
            self.keys("adapter", adapter, {k: (lambda v, k=k: method.__setitem__(k, v)) for k in (
                "target_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save", "init_ia3_weights")}
                | {"postprocessor": postprocessor}, harmless)
        else:
            self.refuse("adapter.type", kind, "slimtune maps Ludwig's lora and ia3 adapters; write a slimtune "
                                              "recipe for other methods")

    def quantize(self) -> None:
        if self.config.get("quantization") is None:
            return
        q = self.section("quantization")
        bits = q.get("bits", 4)
        self.quantization = {"bits": bits}
        if bits == 4:
            self.quantization.update(quant_type=q.get("bnb_4bit_quant_type", "nf4"),
                                     double_quant=q.get("bnb_4bit_use_double_quant", True),
                                     compute_dtype=q.get("bnb_4bit_compute_dtype"))
        ignored = {"bits", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"}
        self.keys("quantization", {k: v for k, v in q.items() if k not in ignored}, {},
                  {"llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False})

    def trainer(self) -> None:
        trainer, training, model = self.section("trainer"), self.out["training"], self.out["model"]
        if trainer.get("type", "none") != "finetune":
            self.refuse("trainer.type", trainer.get("type", "none"), "Ludwig's default 'none' trains nothing "
                                                                     "(zero-shot); set trainer: {type: finetune}")
        if "epochs" not in trainer and "train_steps" not in trainer:
            self.refuse("trainer.epochs", None, "Ludwig's default is 100 epochs with early stopping, which slimtune "
                                                "does not do; set trainer.epochs or trainer.train_steps")
        training.update(learning_rate=0.001, max_grad_norm=0.5, eval_batch_size=2)  # Ludwig's finetune defaults

        def number(key: str, target: str) -> Callable[[Any], None]:
            def put(value: Any) -> None:
                if value == "auto":
                    self.refuse(f"trainer.{key}", value, "give a number: slimtune does not search for one")
                else:
                    training[target] = value
            return put

        def scheduler(value: Any) -> None:
            decay = value.get("decay") if isinstance(value, dict) else None
            warmup = isinstance(value, dict) and bool(value.get("warmup_fraction"))
            constant = "constant_with_warmup" if warmup else "constant"
            training["lr_scheduler"] = {None: constant, "linear": "linear", "cosine": "cosine"}.get(decay, constant)
            if decay not in (None, "linear", "cosine"):
                self.refuse("trainer.learning_rate_scheduler.decay", decay, "slimtune decays linear or cosine")
            self.keys("trainer.learning_rate_scheduler", {k: v for k, v in (value or {}).items() if k != "decay"},
                      {"warmup_fraction": lambda v: training.__setitem__("warmup_ratio", v)},
                      {"warmup_evaluations": 0, "reduce_on_plateau": 0})

        def optimizer(value: Any) -> None:
            kind = (value or {}).get("type", "adam")
            if kind not in OPTIMIZERS:
                self.refuse("trainer.optimizer.type", kind, f"slimtune has {sorted(OPTIMIZERS)}")
            training["optim"] = OPTIMIZERS.get(kind, "adamw")
            decay = (value or {}).get("weight_decay") or 0
            if kind in ("adam", "adam_8bit") and decay:
                self.refuse("trainer.optimizer.weight_decay", decay, f"Ludwig's {kind} adds weight decay to the "
                            "gradient (L2), which slimtune's AdamW does not: use type: adamw (decoupled weight "
                            "decay) or weight_decay: 0")
            self.keys("trainer.optimizer", {k: v for k, v in (value or {}).items() if k != "type"}, {
                "betas": lambda v: training.__setitem__("adam_betas", list(v)),
                "eps": lambda v: training.__setitem__("adam_epsilon", v),
                "weight_decay": lambda v: training.__setitem__("weight_decay", v)}, {"amsgrad": False})

        def clipping(value: Any) -> None:
            self.keys("trainer.gradient_clipping", value or {},
                      {"clipglobalnorm": lambda v: training.__setitem__("max_grad_norm", v)},
                      {"clipnorm": None, "clipvalue": None})

        def early_stop(value: Any) -> None:
            if value != -1:
                self.refuse("trainer.early_stop", value, "slimtune trains for the epochs or steps given (no early "
                                                         "stopping); set -1 or remove it")

        self.keys("trainer", trainer, {
            "type": lambda v: None, "learning_rate": number("learning_rate", "learning_rate"),
            "batch_size": number("batch_size", "batch_size"), "eval_batch_size": number("eval_batch_size",
                                                                                        "eval_batch_size"),
            "gradient_accumulation_steps": number("gradient_accumulation_steps", "gradient_accumulation_steps"),
            "epochs": lambda v: training.__setitem__("epochs", v),
            "train_steps": lambda v: training.__setitem__("max_steps", v),
            "steps_per_checkpoint": lambda v: training.__setitem__("save_every", v),
            "enable_gradient_checkpointing": lambda v: model.__setitem__("gradient_checkpointing", v),
            "learning_rate_scheduler": scheduler, "optimizer": optimizer, "gradient_clipping": clipping,
            "early_stop": early_stop},
            {"should_shuffle": True, "use_mixed_precision": False, "compile": False,
             "regularization_lambda": 0.0, "base_learning_rate": 0.0, "checkpoints_per_epoch": 0})

    def generation(self) -> None:
        self.keys("generation", self.section("generation"), {"max_new_tokens": self.set("demo", "max_new_tokens")},
                  {"do_sample": False, "num_beams": 1})

    def preprocessing(self, lengths: list[int | None]) -> None:
        data = self.out["data"]
        self.keys("preprocessing", self.section("preprocessing"), {
            "global_max_sequence_length": self.set("data", "max_seq_length"),
            "sample_size": self.set("data", "max_train_examples")}, {"sample_ratio": 1.0, "split": None})
        if "max_seq_length" not in data and all(n is not None for n in lengths):
            data["max_seq_length"] = sum(n for n in lengths if n is not None)

    def run(self) -> dict[str, Any]:
        self.top()
        in_column, in_max = self.feature("input_features")
        out_column, out_max = self.feature("output_features")
        template = self.prompt(in_column)
        self.adapter()
        self.quantize()
        self.trainer()
        self.generation()
        self.preprocessing([in_max, out_max])
        extra = {k: v for k, v in self.config.items() if k not in LUDWIG_KEYS}
        unknown = sorted(set(extra) - set(SLIMTUNE_SECTIONS))
        for key in unknown:
            self.refuse(key, extra[key], f"neither a Ludwig LLM key {list(LUDWIG_KEYS)} nor a slimtune section "
                                         f"{list(SLIMTUNE_SECTIONS)}")
        dataset = (extra.get("data") or {}).get("dataset")
        if not dataset:
            self.refuse("data.dataset", dataset, "Ludwig takes the dataset on its command line; give it as "
                                                 "data.dataset (in the file, or an override data.dataset=train.csv)")
        if self.problems:
            raise RecipeError("this Ludwig config has keys slimtune cannot honour (remove or change them):\n  - "
                              + "\n  - ".join(self.problems))
        self.out["data"]["dataset"] = json.dumps({"source": dataset, "prompt": template, "response": out_column})
        recipe: dict[str, Any] = {
            "description": f"Ludwig config: {self.out['method']['peft_type']} on {self.out['model']['name_or_path']}",
            **self.out, "quantization": self.quantization,
        }
        for key, value in extra.items():  # slimtune's own sections win over what Ludwig's keys map to
            if key == "data":
                value = {k: v for k, v in value.items() if k != "dataset"}
            recipe[key] = {**(recipe.get(key) or {}), **value} if isinstance(value, dict) else value
        return recipe


def ludwig_to_recipe_dict(config: dict[str, Any]) -> dict[str, Any]:
    """A slimtune recipe dict (for :func:`slimtune.train.recipe.recipe_from_dict`) from Ludwig's LLM config.

    Raises :class:`RecipeError` naming every key that slimtune cannot honour, with the reason.
    """
    return _Mapper(config).run()
