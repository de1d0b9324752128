"""Saving and restoring parameter trees with Orbax (atomic, no pickle)."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from cnnflat_jax import paths
from cnnflat_jax.errors import Error
from cnnflat_jax.run import lost_peer
from cnnflat_jax.run import workdir as workdir_lib


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
    try:
        with _orbax_quiet(), _stderr_held(), ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(workdir_lib.absolute(path), params, force=True)
            checkpointer.wait_until_finished()
    except Exception as e:
        raise CheckpointWriteError(f"could not write {os.fspath(path)}: {_cause(e)}") from None


class CheckpointReadError(Error, ValueError):
    """Saved parameters that cannot be read: files missing or damaged, or another
    model's shapes."""


def load_params(path: str | os.PathLike, like: Any) -> Any:
    """Restores a tree saved by ``save_params`` into the structure of ``like``.

    ``like`` may hold arrays or ``jax.ShapeDtypeStruct``s.

    Raises:
      CheckpointReadError: (a ``ValueError``) in one line: the files are
        missing or damaged, or hold other shapes (named).
    """
    device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
    # On this process's first device, whatever topology trained them.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    try:  # TensorStore's threads print their own tracebacks of a damaged file: held back.
        with _orbax_quiet(), _stderr_held(), ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(workdir_lib.absolute(path), abstract)
    except Exception as e:
        raise CheckpointReadError(
            f"{os.fspath(path)} cannot be read ({_cause(e)[:300]}): its files are missing, "
            "damaged or another model's"
        ) from None


@contextlib.contextmanager
def _stderr_held(show: bool = True) -> Iterator[None]:
    """Holds back what the block writes to stderr: shown if it succeeds (and
    ``show``), dropped if it raises. A damaged checkpoint or a full disk makes Orbax and TensorStore
    threads log and print tracebacks of their own; the caller reports the
    failure in one line instead. Not in a multi-process run, whose stderr goes
    through ``lost_peer``'s filter: there a lost peer's fatal line must pass."""
    if lost_peer.filtering():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            # Reads and writes still in flight fail after Orbax gave up, each
            # printing a traceback: let them finish while stderr is held.
            for _ in range(10):
                gc.collect()
                time.sleep(0.1)
            raise
        else:
            sys.stderr.flush()
            held.seek(0)
            if show:
                os.write(saved, held.read())
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class CheckpointWriteError(Error, OSError):
    """A checkpoint could not be written (a full disk, a permission); the
    checkpoints written before it are intact, and the message says so."""

    def __init__(self, message: str):
        super().__init__(f"{message}; the checkpoints before it are intact")


def _cause(error: Exception) -> str:
    """The OS's words for an Orbax/TensorStore failure, else its first line."""
    code = re.search(r"os_error_code='(\d+)'", str(error))
    if code:
        return os.strerror(int(code[1]))
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class IncompatibleCheckpointError(Error, ValueError):
    """A workdir's checkpoint does not fit the model the config asks for."""


def _shapes(tree: Any) -> dict[str, list[int]]:
    return {
        jax.tree_util.keystr(path): list(x.shape) for path, x in jax.tree.leaves_with_path(tree)
    }


class RunCheckpoints:
    """The train state and the run's position, saved with an Orbax ``CheckpointManager``.

    Each checkpoint holds the state's arrays (the PRNG key as raw key data)
    and, as JSON, ``progress``: where the data order stands (epoch, next
    dispatch, the epoch's metric sums so far) plus the shape of every array
    and ``run_config``, the run's whole config, with ``data_contents``, a
    picture folder's digest (``Dataset.contents``): its identity, kept where a
    resume finds it. Orbax writes each checkpoint to a temporary directory and renames it when
    complete, so a run killed mid-save leaves the previous checkpoint usable.
    Every process calls every method (Orbax's multi-host rules); the primary
    process writes.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int,
        run_config: dict[str, Any] | None = None,
        data_contents: str = "",
    ):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        with _orbax_quiet():
            self._manager = ocp.CheckpointManager(workdir_lib.absolute(directory), options=options)
        self.directory = os.fspath(directory)
        self.run_config = run_config
        self.data_contents = data_contents

    def latest_step(self) -> int | None:
        with _orbax_quiet():
            return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the finished checkpoints, newest first."""
        with _orbax_quiet():
            return sorted(self._manager.all_steps(), reverse=True)

    def set_aside(self, step: int, directory: str | os.PathLike) -> str:
        """Moves the checkpoint of ``step`` into ``directory`` (a damaged one,
        kept for a look but out of the way of new saves); returns its new path.

        Its failed restore left reads suspended; they end here, their complaints
        dropped (collected later, at the latest at exit, each prints a traceback)."""
        with _stderr_held(show=False):
            gc.collect()
        target = workdir_lib.path(directory, str(step))
        paths.move_tree(workdir_lib.path(self.directory, str(step)), target)
        with _orbax_quiet():
            self._manager.reload()
        return target

    def save(self, step: int, state: Any, progress: dict[str, Any]) -> None:
        """Writes the checkpoint of ``step``.

        Raises:
          CheckpointWriteError: it could not be written; the older ones are intact.
        """
        arrays = _arrays(state)
        progress = {
            **progress, "shapes": _shapes(arrays), "config": self.run_config,
            "data_contents": self.data_contents,
        }  # fmt: skip
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), progress=ocp.args.JsonSave(progress)
        )
        try:
            with _orbax_quiet(), _stderr_held():
                self._manager.save(step, args=args, force=True)
        except Exception as e:
            raise CheckpointWriteError(
                f"could not write the checkpoint of step {step} in {self.directory}: {_cause(e)}"
            ) from None

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """The state saved at ``step`` (shaped, typed and sharded like ``like``) and its progress.

        Raises:
          IncompatibleCheckpointError: the checkpoint's arrays have other shapes.
        """
        with _orbax_quiet(), _stderr_held():
            progress = self._manager.restore(
                step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
            )["progress"]
        arrays = _arrays(like)
        expected = _shapes(arrays)
        differ = [
            f"{path}: saved {progress['shapes'].get(path)}, needed {shape}"
            for path, shape in expected.items()
            if progress["shapes"].get(path) != shape
        ]
        if differ or set(progress["shapes"]) != set(expected):
            raise IncompatibleCheckpointError(
                f"the checkpoint in {self.directory} (step {step}) was written for another "
                "model or population size; use a new --workdir or the config it was trained "
                "with. Differences: " + "; ".join(differ[:4] or ["different parameter names"])
            )
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), arrays
        )
        with _orbax_quiet(), _stderr_held():
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        return _from_arrays(restored, like), progress

    def close(self) -> None:
        with _orbax_quiet():
            self._manager.close()


def _arrays(state: Any) -> Any:
    """``state`` with its typed PRNG key as plain uint32 key data (Orbax saves arrays)."""
    return state.replace(key=jax.random.key_data(state.key))


def _from_arrays(arrays: Any, like: Any) -> Any:
    impl = jax.random.key_impl(like.key)
    return arrays.replace(key=jax.random.wrap_key_data(arrays.key, impl=impl))
