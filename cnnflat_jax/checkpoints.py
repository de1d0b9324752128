"""Saving and restoring parameter trees with Orbax (atomic, no pickle)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


@contextlib.contextmanager
def _orbax_quiet() -> Iterator[None]:
    """Orbax logs dozens of INFO lines per save; keep only warnings."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Writes ``params`` to the directory ``path``, replacing an older copy.

    Orbax writes to a temporary directory and renames it when complete, so an
    interrupted save never leaves a half-written ``path``.
    """
    with _orbax_quiet(), ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), params, force=True)
        checkpointer.wait_until_finished()


def load_params(path: str | os.PathLike, like: Any) -> Any:
    """Restores a tree saved by ``save_params`` into the structure of ``like``.

    ``like`` may hold arrays or ``jax.ShapeDtypeStruct``s; a tree whose
    shapes do not match raises ``ValueError`` naming the mismatch.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    with _orbax_quiet(), ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(path), abstract)
