"""The layers a method adapts when ``target_modules`` is left unset: PEFT's defaults by ``model_type``.

PEFT users write ``LoraConfig(r=8)`` or ``IA3Config(task_type="CAUSAL_LM")`` and get the attention
projections (plus the feed-forward output for IA3) of a known architecture; slimtune fills the same names in
when the adapter is added, so the saved ``adapter_config.json`` lists them and reads the same in PEFT.
An architecture without an entry needs explicit ``target_modules`` (the error lists the model's layers).
"""

from __future__ import annotations

from typing import Any

from torch import nn

_QV = ["q_proj", "v_proj"]

# LoRA and its family (DoRA, LoRA-FA, Delta-LoRA, LoRA+), LoHa and VeRA. A string is a full-match regex.
LOW_RANK_TARGETS: dict[str, list[str] | str] = {
    **dict.fromkeys(["llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "stablelm", "opt", "gptj", "gpt_neo", "bart"], _QV),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon", "chatglm", "RefinedWeb", "RefinedWebModel"], ["query_key_value"]),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    "btlm": ["c_proj", "c_attn"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ["query", "value"]),
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}
# VeRA keeps phi to its attention (PEFT's table for VeRA).
VERA_TARGETS: dict[str, list[str] | str] = {**LOW_RANK_TARGETS, "phi": _QV}

# (IA)³: (target_modules, feedforward_modules — those among them whose input is rescaled).
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    **dict.fromkeys(["llama", "mistral"], (["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    **dict.fromkeys(["llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"],
                    (["q_proj", "v_proj", "down_proj"], ["down_proj"])),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    **dict.fromkeys(["gpt_neox", "falcon"], (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])),
    **dict.fromkeys(["bert", "roberta"], (["key", "value", "output.dense"], ["output.dense"])),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
}


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` (a transformers model's architecture name), or None."""
    config: Any = getattr(model, "config", None)
    return getattr(config, "model_type", None)
