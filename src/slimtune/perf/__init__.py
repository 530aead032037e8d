"""Performance: what makes training and generation fast, apart from the methods' equations.

- :mod:`.fused_lora`: one autograd node for a LoRA layer (and its 4-bit base), dropout regenerated from a seed.
- :mod:`.losses`: chunked causal-LM cross-entropy (no full-vocabulary logits tensor).
- :mod:`.activation_checkpointing`: recompute each transformer block in backward, optionally offloading its input.
- :mod:`.kernels`: Triton kernels for the 4-bit base (dequantize, fused dequantize-matmul, batch-1 GEMV).
"""
