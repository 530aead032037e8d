"""Ctrl-C and SIGTERM during training: a stop at the next step boundary that saves a checkpoint."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["StopRequest"]


class StopRequest:
    """Ctrl-C handling: the first SIGINT asks the loop to stop at the next step boundary (and save a
    checkpoint); a second SIGINT interrupts at once. SIGTERM (what a scheduler, ``kill``, Kubernetes or systemd
    send before they kill) asks for the same stop, but never aborts: it often comes twice (a job's every process
    signalled, and torchrun forwarding it to its ranks), and the stop it asks for must still save. Only
    installed in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, notify: Callable[[str], None]) -> None:
        self.requested = False
        self._notify = notify
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # a repeated SIGTERM: the stop is under way
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self._notify(f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort without "
                     "saving)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
