"""``python -m slimtune``: the ``slimtune`` command (what ``torchrun -m slimtune train ...`` starts).

A rank torchrun started ends without the interpreter's teardown, once its exit hooks ran and its output is
flushed. In that teardown a thread of torch's gloo backend could still be freeing the last collective's work (a
barrier's allgather), whose tensors need the GIL to release their Python objects: a thread taking the GIL while the
interpreter finalizes is ended by it, inside a C++ noexcept destructor, so the process aborted ("terminate called
without an active exception", SIGABRT; the core dump's stack: ProcessGroupGloo::runLoop, ~AsyncBarrierWork,
TensorImpl::decref_pyobject, take_gil, PyThread_exit_thread). That happened now and then after a run that had
finished and written all its files: torchrun reported it failed, and with several nodes the other nodes' launchers
waited out their exit barrier (5 minutes) for a node that had crashed.
"""

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable

from slimtune.cli import main
from slimtune.distributed.context import launched_by_torchrun


def _exit_rank(code: int) -> None:
    """End this torchrun rank with ``code``: as an ordinary exit, the threads that are not daemons are waited for
    and the exit hooks run (a W&B run finishes, temporary folders go); logging is closed and the output flushed,
    then the process ends without the interpreter's teardown."""
    wait_for_threads: Callable[[], None] = vars(threading)["_shutdown"]  # (private: what an ordinary exit runs)
    wait_for_threads()
    atexit._run_exitfuncs()
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
