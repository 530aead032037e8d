"""What the installed transformers keeps around SDPA attention, measured once on a one-layer Llama.

Releases differ: transformers 5 calls SDPA with ``is_causal`` and native grouped-query attention, so autograd
keeps k and v at the key/value head count and no mask; 4.57 materializes the causal mask (model dtype,
``batch × 1 × seq × seq``, kept by every layer) and repeats k and v to the query head count first. Rather than
compare version strings, the estimator asks the library: a 32-wide, one-layer model runs one forward under
``saved_tensors_hooks`` (a few milliseconds, cached for the process).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class SdpaLayout:
    kv_repeated: bool  # k and v are kept at the query head count (repeat_kv before SDPA)
    mask_kept: bool  # a batch × 1 × seq × seq causal mask in the model's dtype is kept by each layer


@functools.cache
def sdpa_layout() -> SdpaLayout:
    seq, heads, kv_heads, head_dim = 6, 4, 2, 8  # seq ≠ head_dim: the rotary tables are (1, 1, seq, head_dim)
    config = LlamaConfig(vocab_size=16, hidden_size=heads * head_dim, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model(input_ids=torch.zeros(1, seq, dtype=torch.long), use_cache=False)
    return SdpaLayout(kv_repeated=(1, kv_heads, seq, head_dim) not in shapes, mask_kept=(1, 1, seq, seq) in shapes)
