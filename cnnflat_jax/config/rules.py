"""The rule vocabulary of the config schema: what a field may hold, and the one-line
``ConfigError`` a value outside its rule raises."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

from cnnflat_jax import paths
from cnnflat_jax.data import folders
from cnnflat_jax.errors import Error


class ConfigError(Error, ValueError):
    """A config with an unknown field or a value outside its rule."""

    def __init__(self, field: str, value: Any, why: str, allowed: str):
        super().__init__(f"config.{field}={show(value)}: {why}; allowed: {allowed}")


def show(value: Any) -> str:
    """A value as it is written on the command line (``--config.FIELD=VALUE``)."""
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


class Rule:
    """What a field may hold: ``allowed`` in words, ``why(value)`` the fault or None.

    ``allowed`` may be given as a function, called when first read.
    """

    def __init__(self, allowed: str | Callable[[], str], why: Callable[[Any], str | None]):
        self._allowed, self.why = allowed, why

    @property
    def allowed(self) -> str:
        return self._allowed() if callable(self._allowed) else self._allowed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(low, high, low_open=False, high_open=False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    return ""


def integer(low: int | None = None, high: int | None = None) -> Rule:
    def why(value):
        if not _is_int(value):
            return "not an int"
        if low is not None and value < low:
            return f"less than {low}"
        if high is not None and value > high:
            return f"greater than {high}"
        return None

    return Rule("an int" + _bounds(low, high), why)


def number(low=None, high=None, *, low_open=False, high_open=False) -> Rule:
    """A finite float (or int) within the bounds; ``*_open`` excludes the bound."""

    def why(value):
        if not _is_number(value):
            return "not a number"
        if not math.isfinite(value):
            return "not finite"
        if low is not None and (value <= low if low_open else value < low):
            return f"{'not greater than' if low_open else 'less than'} {low}"
        if high is not None and (value >= high if high_open else value > high):
            return f"{'not less than' if high_open else 'greater than'} {high}"
        return None

    return Rule("a finite number" + _bounds(low, high, low_open, high_open), why)


def choice_of(module: str, names: str) -> Rule:
    """One of the names in ``module.names`` (a tuple, or a dict's keys), read
    from that module when the rule is first used."""

    def options() -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(module), names))

    return Rule(
        lambda: ", ".join(options()), lambda v: None if v in options() else "not a known choice"
    )


def boolean() -> Rule:
    return Rule("True or False", lambda v: None if isinstance(v, bool) else "not a bool")


def directory() -> Rule:
    """A directory path, or "" for the default: anything but an existing file."""

    def why(value):
        if not isinstance(value, str):
            return "not a string"
        if value and paths.is_file(value):
            return "a file, not a directory"
        return None

    return Rule('a directory path, or "" for the default', why)


def existing_directory() -> Rule:
    """A directory that exists, or "" for the default: where input data is read."""

    def why(value):
        if not isinstance(value, str):
            return "not a string"
        if value and not paths.is_directory(value):
            return "a file, not a directory" if paths.exists(value) else "no such directory"
        return None

    return Rule('an existing directory, or "" for the default', why)


def dataset_name() -> Rule:
    """A dataset's name, or ``folder:PATH`` naming an existing folder."""

    def why(value):
        if not isinstance(value, str) or not value:
            return "not a non-empty string"
        if folders.is_folder(value) and not paths.is_directory(folders.root(value)):
            return f"{folders.root(value) or 'the path'} is not a directory"
        return None

    return Rule("a TFDS catalog name, or folder:PATH (a folder of class folders)", why)


def image_size() -> Rule:
    def why(value):
        return sequence(integer(1)).why(value) or (len(value) != 2 and "not two items") or None

    return Rule("a pair (height, width) of ints >= 1", why)


def sequence(item: Rule, *, non_empty: bool = False) -> Rule:
    """A tuple (or list) whose every item follows ``item``."""

    def why(value):
        if not isinstance(value, (tuple, list)):
            return "not a tuple"
        if non_empty and not value:
            return "empty"
        for i, v in enumerate(value):
            fault = item.why(v)
            if fault:
                return f"item {i} ({show(v)}) is {fault}"
        return None

    many = "a non-empty tuple" if non_empty else "a tuple"
    return Rule(f"{many} of items each {item.allowed}", why)
