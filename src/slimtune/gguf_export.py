"""Export to GGUF, the single-file format of llama.cpp, Ollama and LM Studio.

Two writers:

- :func:`write_gguf` writes a merged llama-architecture model (``LlamaForCausalLM``: Llama 2/3,
  SmolLM2, TinyLlama, ...) and its tokenizer as one file llama.cpp loads as a model.
- :func:`write_gguf_lora` writes a PEFT LoRA adapter folder as a GGUF LoRA adapter, what
  ``llama-cli --lora`` and Ollama's ``ADAPTER`` take on top of the base model's GGUF.

What llama.cpp checks (``llama-model-loader``, ``llama-vocab``, ``llama-adapter``), and so what these
writers produce:

- Tensors are named ``token_embd.weight``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output,
  ffn_norm, ffn_gate, ffn_up, ffn_down}.weight``, ``output_norm.weight`` and ``output.weight``.
  With tied embeddings there is no ``output.weight``: llama.cpp then reuses ``token_embd``. A
  ``(out, in)`` torch weight is stored as is; GGUF lists dimensions fastest-first, ``ne = [in, out]``.
- ``attn_q`` and ``attn_k`` rows are reordered for GGML's rotary layout (see
  :mod:`slimtune.gguf_quants`), exactly as ``convert_hf_to_gguf.py`` does.
- Metadata values are read with a fixed type and a mismatch is a load error, so the types matter:
  sizes and token ids are UINT32, ``rope.freq_base`` and ``layer_norm_rms_epsilon`` FLOAT32, flags
  BOOL, the vocabulary an array of STRING with INT32 token types.
- A byte-level BPE vocabulary is ``tokenizer.ggml.model = "gpt2"`` with the merges (no scores: BPE
  ignores them, and the converter writes none) and ``tokenizer.ggml.pre`` naming the pre-tokenizer's
  split rules. An unknown name makes llama.cpp fall back to different rules, so it must be right.
- A LoRA adapter is ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``
  (FLOAT32) and, per adapted weight ``W``, ``W.lora_a`` = PEFT's A ``(r, in)`` and ``W.lora_b`` = PEFT's
  B ``(out, r)``. llama.cpp computes ``W x + (alpha / r) · B (A x)`` with ``r`` read from the tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import torch
from safetensors.torch import load_file
from tokenizers import pre_tokenizers
from torch import nn
from transformers import AutoConfig

from slimtune.adapter_files import TRAINING_ONLY
from slimtune.core.files import atomic_file, check_creatable
from slimtune.gguf_quants import QUANT_TYPES, check_quant, encode, permute_qk, tensor_type

ARCH = "llama"
SUPPORTED = "llama (LlamaForCausalLM: Llama 2/3, SmolLM/SmolLM2, TinyLlama and other llama-architecture models)"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLOCK_NAMES = {  # inside model.layers.N -> inside blk.N
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# HF byte-level pre-tokenizer shapes -> llama.cpp's name for the same split rules.
_PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}
# llama.cpp's names whose split rules transformers' GGUF tokenizer loses -> the HF steps before its ByteLevel
_LOST_PRE_STEPS = {"smollm": lambda: [pre_tokenizers.Digits(individual_digits=True)]}  # llama.cpp: "\p{N}" first
_QUANT_TAG = re.compile(r"[.-](?:i?q\d\w*|bf16|f16|f32)$", re.IGNORECASE)  # llama.cpp's file-name suffixes


def gguf_tensor_name(hf_name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; None if llama has no such tensor."""
    module, _, leaf = hf_name.rpartition(".")
    if leaf != "weight":
        return None
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.weight"
    match = _LAYER.match(module)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blk.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
    return None


def _check_architecture(model_type: Any) -> None:
    if model_type != ARCH:
        raise ValueError(f"GGUF export supports {SUPPORTED}; got model_type={model_type!r}. "
                         "Export other architectures with llama.cpp's convert_hf_to_gguf.py.")


def _check_config(config: Any) -> None:
    _check_architecture(getattr(config, "model_type", None))
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"config.{flag}=True is not supported by the GGUF export (transformers' GGUF "
                             "loader drops llama biases); export with llama.cpp's convert_hf_to_gguf.py.")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):  # a llama GGUF has no activation key: llama.cpp and transformers run SiLU
        raise ValueError(f"config.hidden_act={act!r} is not supported by the GGUF export (llama.cpp runs a llama "
                         "model's MLP with SiLU); export with llama.cpp's convert_hf_to_gguf.py.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported by the GGUF export (only 'default' "
                         "RoPE); export with llama.cpp's convert_hf_to_gguf.py.")


def _geometry(config: Any) -> tuple[int, int, int]:
    """``(n_head, n_head_kv, head_dim)``."""
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return n_head, n_kv, head_dim


def _qk_heads(gguf_name: str, config: Any) -> int | None:
    """Heads to permute a ``blk.N.attn_q``/``attn_k`` tensor over, or None for other tensors."""
    n_head, n_kv, _ = _geometry(config)
    return {"attn_q": n_head, "attn_k": n_kv}.get(gguf_name.split(".")[2] if gguf_name.startswith("blk.") else "")


def model_name(config: Any) -> str:
    """``general.name``: the model's folder or file name without a GGUF file's suffix and quantization tag
    (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``): the export has its own type."""
    name = Path(getattr(config, "_name_or_path", "") or "slimtune-export").name
    name = name[:-len(".gguf")] if name.lower().endswith(".gguf") else name
    return _QUANT_TAG.sub("", name) or name


def _output_path(path: str | os.PathLike) -> Path:
    final = Path(path)
    if final.is_dir():
        raise ValueError(f"GGUF output path {str(final)!r} is a folder; pass a file path such as "
                         f"{str(final / 'model.gguf')!r}.")
    check_creatable(final, "the GGUF file")
    final.parent.mkdir(parents=True, exist_ok=True)
    return final


def _write(path: Path, writer_fill) -> None:
    writer = gguf.GGUFWriter(path, ARCH)
    try:
        writer_fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def restore_pre_tokenizer(tokenizer: Any, pre: str | None) -> bool:
    """Put back the split rules of llama.cpp's pre-tokenizer ``pre`` that transformers' GGUF loader drops (SmolLM's
    one-digit split: its tokenizer rebuilt from GGUF is plain ByteLevel), so the tokenizer splits text as the
    model's own did. Returns whether it changed anything."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if pre not in _LOST_PRE_STEPS or backend is None:
        return False
    current = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    if current.get("type") != "ByteLevel":
        return False
    backend.pre_tokenizer = pre_tokenizers.Sequence([*_LOST_PRE_STEPS[pre](), backend.pre_tokenizer])
    return True


def _pre_tokenizer_name(spec: dict) -> str:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = tuple(str(p.get("type")) for p in parts)
    name = _PRE_TOKENIZERS.get(kinds)
    if name == "smollm" and not parts[0].get("individual_digits"):
        name = None
    if name is None or not parts[-1].get("use_regex", True):
        raise ValueError(f"cannot tell llama.cpp's name for the pre-tokenizer {kinds}; pass pre= (slimtune merge "
                         "--pre) with the name convert_hf_to_gguf.py gives this model (e.g. 'llama-bpe' for Llama 3).")
    return name


def vocab_metadata(tokenizer: Any, vocab_size: int, pre: str | None = None) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a byte-level BPE tokenizer (GPT-2, SmolLM, Llama 3 style).

    Ids the tokenizer lacks up to the model's ``vocab_size`` become ``[PAD<id>]`` UNUSED tokens, as the
    converter writes them. Added special tokens are CONTROL, other added tokens USER_DEFINED.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    pre_json = json.dumps(spec.get("pre_tokenizer"))
    if spec.get("model", {}).get("type") != "BPE" or '"ByteLevel"' not in pre_json:
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3 style); got "
                         f"{type(tokenizer).__name__} with model {spec.get('model', {}).get('type')!r}. Sentencepiece "
                         "vocabularies (Llama 2) need llama.cpp's convert_hf_to_gguf.py.")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                         f"{vocab_size}; resize the embeddings (model.resize_token_embeddings) before export.")
    added = {i: t.special for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        kind = gguf.TokenType.NORMAL if i not in added else (
            gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED)
        types[i] = int(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    with_special = tokenizer("a")["input_ids"]
    extra = len(with_special) > len(tokenizer("a", add_special_tokens=False)["input_ids"])
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre or _pre_tokenizer_name(spec),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(extra and with_special[0] == tokenizer.bos_token_id),
        "tokenizer.ggml.add_eos_token": bool(extra and with_special[-1] == tokenizer.eos_token_id),
        "tokenizer.ggml.add_space_prefix": '"add_prefix_space": true' in pre_json,
    }
    for key, attr in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        token_id = getattr(tokenizer, f"{attr}_token_id", None)
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = (int(token_id), gguf.GGUFValueType.UINT32)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _add_metadata(writer: gguf.GGUFWriter, meta: Mapping[str, Any]) -> None:
    """Add values with the type they carry: ``(value, GGUFValueType)`` as given, bool BOOL, str STRING,
    lists arrays (of STRING for str items, INT32 for int items)."""
    for key, value in meta.items():
        if isinstance(value, tuple):
            writer.add_key_value(key, *value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def model_metadata(config: Any, file_type: int, name: str) -> dict[str, Any]:
    """``general.*`` and ``llama.*`` metadata, with the GGUF types llama.cpp reads them as."""
    n_head, n_kv, head_dim = _geometry(config)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = getattr(config, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    meta = {
        "general.type": "model",
        "general.name": name,
        "general.file_type": (int(file_type), u32),
        "general.quantization_version": (gguf.GGML_QUANT_VERSION, u32),
        f"{ARCH}.vocab_size": (config.vocab_size, u32),
        f"{ARCH}.context_length": (config.max_position_embeddings, u32),
        f"{ARCH}.embedding_length": (config.hidden_size, u32),
        f"{ARCH}.block_count": (config.num_hidden_layers, u32),
        f"{ARCH}.feed_forward_length": (config.intermediate_size, u32),
        f"{ARCH}.attention.head_count": (n_head, u32),
        f"{ARCH}.attention.head_count_kv": (n_kv, u32),
        f"{ARCH}.rope.dimension_count": (head_dim, u32),
        f"{ARCH}.rope.freq_base": (float(theta), f32),
        f"{ARCH}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), f32),
    }
    if head_dim * n_head != config.hidden_size:  # llama.cpp defaults the head size to hidden / heads
        meta[f"{ARCH}.attention.key_length"] = (head_dim, u32)
        meta[f"{ARCH}.attention.value_length"] = (head_dim, u32)
    return meta


@torch.no_grad()
def write_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike, quant: str = "f16", *,
               pre: str | None = None, name: str | None = None) -> Path:
    """Write a merged ``LlamaForCausalLM`` and its tokenizer to one GGUF file llama.cpp loads.

    ``quant``: ``"f32"``, ``"f16"`` (like ``convert_hf_to_gguf.py --outtype f16``), ``"q8_0"`` or
    ``"q4_0"`` for the 2-D weights; norms stay F32 (see :func:`slimtune.gguf_quants.tensor_type`).
    ``pre``: llama.cpp's pre-tokenizer name, detected for GPT-2 (``"gpt-2"``) and SmolLM
    (``"smollm"``) tokenizers. Adapters must be merged first (``slimtune.export.merge_for_export``).
    The file appears at ``path`` only once complete. Returns ``path``.
    """
    quant = check_quant(quant)
    config: Any = getattr(model, "config", None)
    _check_config(config)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    names = {k: gguf_tensor_name(k) for k in state}
    unknown = sorted(k for k, name in names.items() if name is None)
    if unknown:
        raise ValueError(f"{type(model).__name__} holds tensors a llama GGUF has no place for: {unknown[:6]}"
                         f"{' ...' if len(unknown) > 6 else ''}. Export a plain LlamaForCausalLM with adapters "
                         "merged (slimtune.export.merge_for_export) and no quantized layers.")
    weights = {name: state[k] for k, name in names.items() if name is not None}  # GGUF name -> tensor
    embed, head = weights["token_embd.weight"], weights.get("output.weight")
    tied = head is None or head.data_ptr() == embed.data_ptr() or torch.equal(head, embed)
    if tied:  # llama.cpp uses token_embd as the output matrix when output.weight is absent
        weights.pop("output.weight", None)
    meta = model_metadata(config, QUANT_TYPES[quant][1], name or model_name(config))
    meta.update(vocab_metadata(tokenizer, config.vocab_size, pre))

    def fill(writer: gguf.GGUFWriter) -> None:
        _add_metadata(writer, meta)
        for gname, w in weights.items():
            heads = _qk_heads(gname, config)
            w = permute_qk(w.float(), heads) if heads else w
            is_output = gname == "output.weight" or (tied and gname == "token_embd.weight")
            qtype = tensor_type(quant, tuple(w.shape), is_output)
            writer.add_tensor(gname, encode(w, qtype), raw_dtype=qtype)

    with atomic_file(_output_path(path)) as tmp:  # the file appears whole or not at all
        _write(tmp, fill)
    return Path(path)


def _load_config(base_config: Any) -> Any:
    if isinstance(base_config, (str, os.PathLike)):
        file = Path(base_config)
        file = file / "config.json" if file.is_dir() else file
        if not file.is_file():
            raise FileNotFoundError(f"base model config {file} does not exist; pass the base model's folder, "
                                    "its config.json, or its transformers config.")
        base_config = json.loads(file.read_text())
    if isinstance(base_config, Mapping):
        data = dict(base_config)
        _check_architecture(data.get("model_type"))
        base_config = AutoConfig.for_model(data.pop("model_type"), **data)
    return base_config


@torch.no_grad()
def write_gguf_lora(adapter_dir: str | os.PathLike, base_config: Any, path: str | os.PathLike,
                    quant: str = "f32") -> Path:
    """Write a PEFT LoRA adapter folder as a GGUF LoRA adapter for a llama base model.

    ``adapter_dir``: ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format.
    ``base_config``: the base model's transformers config, its ``config.json`` (dict or path), or its
    folder: the head counts fix the q/k permutation, which applies to ``lora_b`` only. ``quant``:
    ``"f32"`` (llama.cpp's default for adapters) or ``"f16"``.

    llama.cpp scales every pair by ``alpha / r_layer``. The file's alpha is ``lora_alpha`` (times
    ``sqrt(r)`` for rsLoRA, whose scale is ``lora_alpha / sqrt(r)``); a layer whose PEFT scale differs
    from ``alpha / r_layer`` (rsLoRA with a ``rank_pattern``) has the ratio folded into its ``lora_b``.
    """
    quant = check_quant(quant, ("f32", "f16"))
    folder = Path(adapter_dir)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{folder} must hold adapter_config.json and adapter_model.safetensors "
                                "(PEFT's format; the pickle adapter_model.bin is refused for safety).")
    lora = json.loads(config_file.read_text())
    problems = {"peft_type": lora.get("peft_type") != "LORA", "use_dora": lora.get("use_dora"),
                "alpha_pattern": lora.get("alpha_pattern"), "modules_to_save": lora.get("modules_to_save"),
                "fan_in_fan_out": lora.get("fan_in_fan_out")}
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise ValueError(f"adapter fields {[f'{k}={lora.get(k)!r}' for k in bad]} have no GGUF LoRA form (plain "
                         "LoRA pairs, one alpha); merge the adapter into the model instead (`slimtune merge "
                         "--format gguf`, or write_gguf from Python).")
    config = _load_config(base_config)
    _check_config(config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(weights_file).items():
        if key.endswith(".base_layer.weight") or TRAINING_ONLY.search(key):  # PEFT may store untouched base weights
            continue  # (llama.cpp skips them too), and a LoRA variant's training-only state
        match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$", key)
        gname = gguf_tensor_name(f"{match.group(1)}.weight") if match else None
        if match is None or gname is None or gname.endswith(("_norm.weight", "token_embd.weight")):
            raise ValueError(f"adapter tensor {key!r} has no GGUF LoRA form; llama.cpp adapters hold lora_A/lora_B "
                             "of linear layers (q/k/v/o_proj, gate/up/down_proj, lm_head).")
        pairs.setdefault(gname, {})[match.group(2)] = t.float()
    if "output.weight" in pairs and getattr(config, "tie_word_embeddings", False):
        raise ValueError("the adapter targets lm_head, but the base model ties it to the embeddings; llama.cpp has "
                         "no separate output tensor to adapt. Train without lm_head in target_modules.")
    r_cfg, alpha = int(lora.get("r", 8)), float(lora.get("lora_alpha", 8))
    rslora = bool(lora.get("use_rslora"))
    file_alpha = alpha * math.sqrt(r_cfg) if rslora else alpha

    def fill(writer: gguf.GGUFWriter) -> None:
        # the keys and types convert_lora_to_gguf.py writes (general.architecture comes with the writer)
        writer.add_string("general.type", "adapter")
        writer.add_string("general.name", folder.resolve().name)
        writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", file_alpha)
        qtype = QUANT_TYPES[quant][0]
        for gname, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"adapter has only lora_{''.join(pair)} for {gname}; the file is incomplete.")
            a, b = pair["A"], pair["B"]  # (r, in), (out, r)
            r = a.shape[0]
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            b = b * (scale * r / file_alpha) if not math.isclose(scale * r, file_alpha) else b
            heads = _qk_heads(gname, config)
            b = permute_qk(b, heads) if heads else b
            writer.add_tensor(f"{gname}.lora_a", encode(a, qtype), raw_dtype=qtype)
            writer.add_tensor(f"{gname}.lora_b", encode(b, qtype), raw_dtype=qtype)

    with atomic_file(_output_path(path)) as tmp:  # the file appears whole or not at all
        _write(tmp, fill)
    return Path(path)
