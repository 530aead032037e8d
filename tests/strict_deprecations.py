"""``make test-latest``: a deprecation warning that transformers raises for a call slimtune made fails the test.

Enabled by ``SLIMTUNE_STRICT_DEPRECATIONS=1``. Each ``DeprecationWarning``/``FutureWarning`` (and each
transformers log record that says "deprecated") is traced to the call that caused it: walking out of
the stack from the warning, past transformers' and torch's own frames, the first other frame decides.
In ``src/slimtune``, ``tests`` or ``bench`` it is ours and the test fails at teardown; in PEFT,
bitsandbytes or anything else it is theirs and is left alone (the oracles may lag a release).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = tuple(str(ROOT / part) for part in ("src/slimtune", "tests", "bench"))
PASS_THROUGH = ("/transformers/", "/torch/", "/warnings.py", "/logging/", "/functools.py", "/contextlib.py",
                "/typing_extensions.py", "/huggingface_hub/")

offenses: list[str] = []


def _first_foreign_frame(frame):
    """The first frame, going outwards, that belongs to neither transformers nor torch (nor plumbing)."""
    while frame is not None and any(p in frame.f_code.co_filename for p in PASS_THROUGH):
        frame = frame.f_back
    return frame


def _check(message: str, frame) -> None:
    if frame is None or "/transformers/" not in frame.f_code.co_filename:
        return  # only transformers' deprecations are policed
    culprit = _first_foreign_frame(frame)
    if culprit is not None and culprit.f_code.co_filename.startswith(OURS) \
            and "strict_deprecations" not in culprit.f_code.co_filename:
        offenses.append(f"{culprit.f_code.co_filename}:{culprit.f_lineno}: {message}")


def install() -> None:
    original_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if isinstance(kind, type) and issubclass(kind, (DeprecationWarning, FutureWarning)):
            _check(str(message), sys._getframe(1))
        return original_warn(message, category, stacklevel + 1, source, **kwargs)

    warnings.warn = warn

    class DeprecationLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if "deprecat" in text.lower():
                frame = sys._getframe(0)
                while frame is not None and frame.f_code.co_filename != record.pathname:
                    frame = frame.f_back
                _check(text, frame)

    logging.getLogger("transformers").addHandler(DeprecationLog(level=logging.WARNING))


def take_offenses() -> list[str]:
    found = list(dict.fromkeys(offenses))
    offenses.clear()
    return found
