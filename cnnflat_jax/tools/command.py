"""The frame every command runs in: what it says when it fails, and its exit code.

A command's ``main`` is its arguments and its work; this module owns the rest.
Every failure a user can cause or mend (a missing or damaged file, a bad
value, a full disk) is one line on stderr, ``error: WHAT``, and exit code 1;
a wrong command line is one ``usage:`` line; a stop signal is the line that
names it (``signals.stop_words``) and exit code 128 + its number. Never a
traceback for any of these. ``config_errors`` and ``parse_config_flags`` do the
same for the commands that take a config (``--config``, ``--config.FIELD=V``).
"""

from __future__ import annotations

import contextlib
import os
import re
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


@contextlib.contextmanager
def config_errors(argv: list[str]) -> Iterator[None]:
    """Exits with one ``error:`` line if the block fails loading the config.

    Wrap the definition, parsing and first use of a ``config_flags`` flag:
    any exception there comes from the config file (missing, or raising as
    it runs), from a ``--config.FIELD`` override naming no field, or from a
    value that does not parse as its field's type.
    """
    from absl import flags

    from cnnflat_jax import config as config_lib
    from cnnflat_jax import configs

    try:
        yield
    except flags.Error as e:
        match = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", str(e))
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if not match and len(lines) > 1:  # The config file raised: absl quotes its traceback.
            fail(f"config file {_flag_value(argv, 'config') or 'default'}: {lines[-1]}")
        if not match:
            fail(str(e))
        key, value, why = match.groups()
        field = config_lib.FIELDS.get(key) or config_lib.MODEL_FIELDS.get(
            key.removeprefix("model.")
        )
        allowed = f"; allowed: {field.rule.allowed}" if field else ""
        fail(f"config.{key}={value}: {why}{allowed}")
    except (AttributeError, KeyError) as e:
        fail(_unknown_override(e, argv))
    except Exception as e:  # Whatever the config file's own code raised.
        reason = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = f"{type(e).__name__}: {reason[-1]}" if reason else type(e).__name__
        spec = _flag_value(argv, "config")
        if spec and not os.path.exists(configs.resolve(spec).partition(":")[0]):
            detail += f"; a config is a file's path or a shipped one: {', '.join(configs.NAMES)}"
        fail(f"config file {spec or 'default'}: {detail}")


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last ``--flag=V`` or ``--flag V`` in ``argv``, if given."""
    for i, arg in reversed(list(enumerate(argv))):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_override(error: BaseException, argv: list[str]) -> str:
    """``config.FIELD=VALUE: unknown field ...`` for ml_collections' KeyError."""
    from cnnflat_jax import config as config_lib

    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    detail = str(error.args[0] if error.args else error)
    key = re.match(r"'?([^'\n]+)", detail)[1]
    hint = re.search(r'Did you mean "([^"]+)"', detail)
    why = "unknown field" + (f" (did you mean {hint[1]}?)" if hint else "")
    for arg in argv:
        path = arg.removeprefix("--").split("=", 1)[0]
        if not (path.startswith("config.") and key in path.split(".")[1:]):
            continue
        value = arg.split("=", 1)[1] if "=" in arg else _flag_value(argv, path)
        group = path.removeprefix("config.").rpartition(".")[0]
        if group == "model":
            known = sorted(config_lib.MODEL_FIELDS)
        else:
            prefix = f"{group}." if group else ""
            known = sorted(
                k.removeprefix(prefix) for k in config_lib.default_fields() if k.startswith(prefix)
            )
        return f"{path}={value}: {why}; allowed: {', '.join(known)}"
    return f"config.{key}: {why}"


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's parser, with one ``error:`` line for a bad flag or config file; a
    shipped config's name in ``--config`` stands for its file."""
    from absl import flags

    from cnnflat_jax import configs

    argv = configs.resolve_flags(argv)
    with config_errors(argv):
        return flags.FLAGS(argv)
