"""Quantization of frozen base models: NF4 / FP4 4-bit (QLoRA) with double quantization, int8 row-wise.

Pure tensor functions live in ``nf4`` / ``int8`` / ``codebooks``; ``linear`` holds the thin frozen
modules; ``model`` / ``loading`` / ``checkpoint`` work on whole models and safetensors files in
transformers+bitsandbytes' layout. No bitsandbytes import: it is only a test oracle.
"""

from slimtune.quant.checkpoint import load_quantized_checkpoint, save_quantized
from slimtune.quant.codebooks import codebook, dynamic_map
from slimtune.quant.config import QuantConfig
from slimtune.quant.int8 import dequantize_int8_rowwise, quantize_int8_rowwise
from slimtune.quant.linear import Linear4bit, Linear8bit, QuantizedLinear
from slimtune.quant.model import (
    QuantSummary,
    dequantize_model,
    quant_summary,
    quantize,
    requantization_error,
)
from slimtune.quant.nf4 import (
    dequantize_4bit,
    double_dequantize,
    double_quantize,
    pack_4bit,
    quantize_4bit,
    unpack_4bit,
)
from slimtune.quant.streaming import (
    CheckpointNeedsMerging,
    init_empty_weights,
    init_random_quantized,
    load_in_4bit,
    load_quantized,
    load_quantized_from_state_dict,
)

__all__ = [
    "QuantConfig",
    "QuantizedLinear",
    "Linear4bit",
    "Linear8bit",
    "QuantSummary",
    "quantize",
    "quant_summary",
    "dequantize_model",
    "requantization_error",
    "CheckpointNeedsMerging",
    "init_empty_weights",
    "init_random_quantized",
    "load_quantized",
    "load_in_4bit",
    "load_quantized_from_state_dict",
    "save_quantized",
    "load_quantized_checkpoint",
    "codebook",
    "dynamic_map",
    "quantize_4bit",
    "dequantize_4bit",
    "pack_4bit",
    "unpack_4bit",
    "double_quantize",
    "double_dequantize",
    "quantize_int8_rowwise",
    "dequantize_int8_rowwise",
]
