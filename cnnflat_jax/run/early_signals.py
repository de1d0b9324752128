"""SIGINT and SIGTERM outside a run's own handling: the process ends at once, in one line.

``train.py`` calls ``exit_on_signals`` before it imports JAX, so that a
signal while it starts up never raises inside an import or an XLA callback
(a ``KeyboardInterrupt`` there prints a traceback, or is swallowed);
``run_state.stop_signals`` then takes the signals over for the run, and hands
them back when it ends. While the interpreter finalises, once every other exit
function has run, they are ignored: the process ends as it was ending. Only
the standard library is imported here.
"""

import atexit
import os
import signal

_stage = ["starting up; nothing new was saved"]
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_on_signals(stage: str) -> None:
    """From now on (until a run takes over), SIGINT or SIGTERM ends the process
    with exit code 128 + the signal's number and the line
    ``interrupted (SIGINT) while STAGE``; in the interpreter's last moments,
    after every other exit function, they are ignored (``_ignore_signals``)."""
    _stage[0] = stage
    for signum in _SIGNALS:
        signal.signal(signum, _exit)


def _ignore_signals() -> None:
    """As the interpreter finalises, Python runs no more handlers and then resets
    the ones it set to the default, which would end the process by the signal,
    without a line, after it finished its work (exit code -15). Ignored signals
    stay ignored, and the process ends as it was ending."""
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _exit(signum: int, frame) -> None:
    del frame
    what = "preempted" if signum == signal.SIGTERM else "interrupted"
    os.write(2, f"{what} ({signal.Signals(signum).name}) while {_stage[0]}\n".encode())
    os._exit(128 + signum)


# Registered on import, before the libraries that ``train.py`` imports next
# register theirs: exit functions run last-registered first, so this one runs last.
atexit.register(_ignore_signals)
