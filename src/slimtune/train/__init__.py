"""slimtune's training engine.

Submodules (imported on demand, so ``import slimtune.train`` stays cheap):

- :mod:`slimtune.train.models`: model + tokenizer loading, the embedded default model, the cache.
- :mod:`slimtune.train.data`: user datasets (JSONL / JSON / CSV / chat messages / HF datasets).
- :mod:`slimtune.train.pycode`: the built-in ``pycode`` dataset mined from the Python stdlib.
- :mod:`slimtune.train.templates`: prompt templates (the tokenizer's chat template or a plain one).
- :mod:`slimtune.train.tokenization`: tokenization with prompt masking, truncation, packing.
- :mod:`slimtune.train.batching`: padding collate and the deterministic, resumable batch iterator.
"""
