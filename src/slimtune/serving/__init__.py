"""Serving many adapters on one base: :class:`Decoder` (greedy decoding, each row its own adapter, at the
base model's speed) and the row routing it shares with :func:`slimtune.mixed_batch`."""

from slimtune.serving.decoder import Decoder

__all__ = ["Decoder"]
