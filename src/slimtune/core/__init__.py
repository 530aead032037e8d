"""The lowest layer: what injection, methods, quantization and training all build on.

Nothing here imports another slimtune package (only :mod:`slimtune.compat` and :mod:`slimtune.config`
for types), so every module above can import it without a cycle.

- :mod:`.state`: the one record of what slimtune did to a model (``model.slimtune_state``).
- :mod:`.modules`: module surgery and layer geometry (replace a submodule, Conv1D, output head, blocks).
- :mod:`.targets`: PEFT's rules for which modules an adapter applies to.
- :mod:`.files`: files and folders written as one unit (temp + fsync + rename).
- :mod:`.dtypes`: dtype names, compute-dtype defaults, devices.
- :mod:`.dropout`: seeded inverted-dropout masks (regenerated in backward instead of stored).
"""
