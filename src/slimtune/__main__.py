"""``python -m slimtune``: the ``slimtune`` command (what ``torchrun -m slimtune train ...`` starts).

A rank torchrun started ends without the interpreter's teardown, once its output is flushed: that teardown
destroys what torch's gloo backend leaves behind after the process group is gone, and now and then aborts the
process there ("terminate called without an active exception", SIGABRT) after a run that finished, and whose
files were all written: torchrun then reported the run as failed, and, with several nodes, the other nodes' launchers
waited out their exit barrier (5 minutes) for a node that had crashed.
"""

import atexit
import logging
import os
import sys

from slimtune.cli import main
from slimtune.distributed.context import launched_by_torchrun


def _exit_rank(code: int) -> None:
    """End this torchrun rank with ``code``: the exit hooks run (a W&B run finishes, temporary folders go), logging
    is closed and the output flushed, then the process ends without the interpreter's teardown."""
    atexit._run_exitfuncs()  # what an ordinary exit runs first, while everything is alive
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed stream or a pipe the reader closed: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    status = main()
    if launched_by_torchrun():
        _exit_rank(status)
    sys.exit(status)
