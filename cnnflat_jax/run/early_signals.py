"""SIGINT and SIGTERM outside a run's own handling: the process ends at once, in one line.

``train.py`` calls ``exit_on_signals`` before it imports JAX, so that a
signal while it starts up never raises inside an import or an XLA callback
(a ``KeyboardInterrupt`` there prints a traceback, or is swallowed);
``run_state.stop_signals`` then takes the signals over for the run, and hands
them back when it ends. Only the standard library is imported here.
"""

import os
import signal

_stage = ["starting up; nothing new was saved"]


def exit_on_signals(stage: str) -> None:
    """From now on (until a run takes over), SIGINT or SIGTERM ends the process
    with exit code 128 + the signal's number and the line
    ``interrupted (SIGINT) while STAGE``."""
    _stage[0] = stage
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit)


def _exit(signum: int, frame) -> None:
    del frame
    what = "preempted" if signum == signal.SIGTERM else "interrupted"
    os.write(2, f"{what} ({signal.Signals(signum).name}) while {_stage[0]}\n".encode())
    os._exit(128 + signum)
