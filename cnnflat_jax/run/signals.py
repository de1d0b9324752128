"""SIGTERM and SIGINT: how every stage of a run stops on them, in one line.

Before JAX loads, ``train.py`` calls ``exit_on_signals``, so that a signal
while it starts up never raises inside an import or an XLA callback (a
``KeyboardInterrupt`` there prints a traceback, or is swallowed): the process
ends at once. ``stop_signals`` then takes the signals over for the run: the
run stops at the next boundary (``Stopping``), saving a checkpoint inside the
training loop, and hands them back when it ends. While the interpreter
finalises, once every other exit function has run, they are ignored: the
process ends as it was ending. ``stop_words`` names a stop the same way
everywhere. Only the standard library is imported at the top.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterator

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
    os.write(2, f"{stop_words(signum)} while {_stage[0]}\n".encode())
    os._exit(128 + signum)


# Registered on import, before the libraries that ``train.py`` imports next
# register theirs: exit functions run last-registered first, so this one runs last.
atexit.register(_ignore_signals)


def stop_words(signum: int) -> str:
    """How every command names a stop: ``preempted (SIGTERM)``, ``interrupted (SIGINT)``."""
    what = "preempted" if signum == signal.SIGTERM else "interrupted"
    return f"{what} ({signal.Signals(signum).name})"


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and rerunning resumes from it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # What a shell reports for that signal.


@dataclasses.dataclass(frozen=True)
class Stopping:
    """Which stop signal (SIGTERM or SIGINT) has arrived, or 0.

    ``at_step(step)`` is asked at the training loop's step boundaries (every
    process agrees on it; the run saves and stops); ``now()`` between the
    phases around the loop (loading, building, compiling, writing outputs),
    where there is nothing to save.
    """

    at_step: Callable[[int], int]
    now: Callable[[], int]


@contextlib.contextmanager
def stop_signals() -> Iterator[Stopping]:
    """Records SIGTERM and SIGINT for the whole run instead of letting them
    kill it or raise mid-way (a ``KeyboardInterrupt`` inside XLA's compiler
    can crash the process): the run stops at the next boundary, in one line.

    With several processes JAX's preemption sync point makes every process
    agree on the step of a SIGTERM; one process catches both itself, from
    its main thread.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        yield Stopping(
            lambda step: signal.SIGTERM * multihost_utils.reached_preemption_sync_point(step),
            lambda: 0,
        )
        return
    if threading.current_thread() is not threading.main_thread():
        yield Stopping(lambda step: 0, lambda: 0)
        return
    received = []

    def first() -> int:
        return received[0] if received else 0

    previous = {
        signum: signal.signal(signum, lambda signum, _: received.append(signum))
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield Stopping(lambda step: first(), first)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stopped_between_phases(signum: int, phase: str, after_training: bool = False) -> Preempted:
    """The stop of a signal that arrived while ``phase`` ran, outside the training loop."""
    done = (
        "the run is finished and its outputs are complete"
        if after_training
        else "training had not (re)started, so nothing new was saved; rerun the same command "
        "to go on"
    )
    return Preempted(f"{stop_words(signum)} while {phase}; {done}", signum)


def stopped_error(signum: int, step: int, checkpoints: str) -> Preempted:
    """The stop of a signal at ``step`` of the training loop, saved in ``checkpoints``."""
    return Preempted(
        f"{stop_words(signum)} at step {step}; saved a checkpoint in {checkpoints}. Rerun the "
        "same command to resume.",
        signum,
    )
