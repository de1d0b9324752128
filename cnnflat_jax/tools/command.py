"""The frame every command runs in: what it says when it fails, and its exit code.

A command's ``main`` is its arguments and its work; this module owns the rest.
Every failure a user can cause or mend (a missing or damaged file, a bad
value, a full disk) is one line on stderr, ``error: WHAT``, and exit code 1;
a wrong command line is one ``usage:`` line; a stop signal is the line that
names it (``signals.stop_words``) and exit code 128 + its number. Never a
traceback for any of these.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn

from cnnflat_jax import errors
from cnnflat_jax.run import signals


def say_error(message: str) -> None:
    """Writes ``error: MESSAGE`` on stderr, at once."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    """Ends the command with ``error: MESSAGE`` and exit code 1."""
    say_error(message)
    sys.exit(1)


def usage(text: str, code: int = 1) -> NoReturn:
    """Ends the command with ``usage: TEXT`` (how to call it) and ``code``."""
    print(f"usage: {text}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def one_line_failures(*also: type[Exception]) -> Iterator[None]:
    """Runs a command's work: an ``errors.Error``, an ``OSError`` or one of
    ``also`` ends the command with one ``error:`` line; a stop signal with its
    own line and exit code."""
    try:
        yield
    except signals.Preempted as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except (errors.Error, OSError, *also) as e:
        fail(str(e))
