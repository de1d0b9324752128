"""Where a run stands, and how it stops and goes on.

The workdir lock, the run's fixed identity (its config), resume past damaged
checkpoints, saves, SIGTERM/SIGINT, and stops on a diverging loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cnnflat_jax import config as config_lib
from cnnflat_jax.errors import Error
from cnnflat_jax.run import checkpoints, lease, reporting
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.run.workdir import RunError


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and rerunning resumes from it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # What a shell reports for that signal.


class DivergedError(Error, RuntimeError):
    """The loss became NaN or Inf, or crossed ``config.max_loss``; the last good
    checkpoint is kept."""


@contextlib.contextmanager
def workdir_lock(workdir: str, lease_sec: float = 60.0) -> Iterator[None]:
    """Creates ``workdir`` and holds an exclusive OS lock on the directory itself
    (process 0 only); ``workdir/.lock`` names the holder's PID for others to read.

    The lock belongs to the directory, not to a file in it, so deleting
    ``.lock`` does not release it; the kernel drops it when the process ends,
    however it ends, so a crash never leaves a stale lock behind.

    On ``gs://`` the lock is a lease object renewed while the run lives, and
    taken over ``lease_sec`` after a crashed run's last renewal, or at once by
    a run on the machine where its holder ran and ended (``lease.py``).

    Raises:
      RunError: the workdir cannot be made or written, ``.lock`` is a symbolic
        link, or another process holds the lock (named by its PID).
    """
    if workdir_lib.is_remote(workdir):
        if jax.process_index() > 0:
            yield
            return
        with lease.Lease(workdir_lib.path(workdir, workdir_lib.LOCK), lease_sec, workdir):
            yield
        return
    workdir_lib.check_path_room(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() > 0:
            directory = None
        else:
            directory = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        why = "it is a file" if os.path.isfile(workdir) else e.strerror
        raise RunError(f"cannot use {workdir} as the workdir: {why} ({e.filename})") from None
    if directory is None:
        yield
        return
    try:
        try:
            fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{workdir} is in use by process {_lock_holder(workdir)}") from None
        workdir_lib.check_no_links(workdir)
        lock = workdir_lib.path(workdir, workdir_lib.LOCK)
        try:
            workdir_lib.replace_file(lock, f"{os.getpid()}\n")
        except OSError as e:
            raise RunError(f"cannot use {workdir} as the workdir: {e.strerror} ({lock})") from None
        yield
    finally:
        os.close(directory)  # Releases the lock.


def _lock_holder(workdir: str) -> str:
    """The PID in ``workdir/.lock``, read without following a link; "unknown" if none."""
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(workdir_lib.path(workdir, workdir_lib.LOCK), flags)) as f:
            return f.read(32).strip() or "unknown"
    except OSError:
        return "unknown"


def check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run in ``workdir`` with a config that computes otherwise.

    A workdir with a checkpoint and a ``config.json`` holds a run whose
    identity is that config's identity fields (``config.is_identity``).

    Raises:
      RunError: naming every differing field as ``old -> new``.
    """
    path = workdir_lib.not_a_link(workdir_lib.path(workdir, workdir_lib.CONFIG))
    saved = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)
    if not workdir_lib.list_names(saved):
        return
    try:
        saved_config = json.loads(workdir_lib.read_bytes(path))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable ({e}); it describes the run to resume") from None
    if not isinstance(saved_config, dict):
        raise RunError(f"{path} is unreadable (not a JSON object); it describes the run to resume")
    _refuse_another_run(workdir, saved_config, config, path)


def _refuse_another_run(
    workdir: str, saved_config: dict[str, Any], config: ml_collections.ConfigDict, source: str
) -> None:
    """Raises ``RunError`` naming each identity field where ``config`` differs
    from ``saved_config`` (the run's own, read from ``source``)."""
    old = config_lib.flat_fields(saved_config)
    new = config_lib.flat_fields(json.loads(config.to_json_best_effort()))
    defaults = config_lib.default_fields()
    changed = [
        f"{key} {config_lib.show(old.get(key, defaults.get(key)))} -> {config_lib.show(value)}"
        for key, value in new.items()
        if config_lib.is_identity(key) and old.get(key, defaults.get(key)) != value
    ]
    if changed:
        raise RunError(
            f"{workdir} holds a run with another config: {'; '.join(changed)}. Rerun with its "
            f"config ({source}) to resume it, or start a new run with another --workdir "
            "(a finished run is not extended: more epochs need a new run and schedule)"
        )


def check_checkpoint_identity(
    workdir: str, config: ml_collections.ConfigDict, saved_config: dict[str, Any] | None
) -> None:
    """Holds ``config`` to the run's identity as the checkpoint resumed from
    saved it (``saved_config``; None in checkpoints of earlier versions), and
    makes ``config.json`` its copy again if it was deleted or edited.

    Raises:
      RunError: ``config`` computes otherwise than the checkpoint's run.
    """
    if saved_config is None:
        return
    _refuse_another_run(workdir, saved_config, config, "saved in its checkpoints")
    path = workdir_lib.path(workdir, workdir_lib.CONFIG)
    try:
        on_disk = json.loads(workdir_lib.read_bytes(path))
    except (OSError, ValueError):
        on_disk = None
    if on_disk != saved_config and jax.process_index() == 0:
        logging.warning("%s was missing or edited; rebuilt it from the checkpoint", path)
        workdir_lib.write_json(path, saved_config)


def global_step(state: Any) -> int:
    """The state's step (a population's members step together)."""
    return int(np.max(state.step))


@dataclasses.dataclass
class RunPosition:
    """Where training goes on: at ``dispatch`` of ``epoch``.

    ``totals`` are that epoch's metric sums so far (empty at its start);
    ``record`` is the last finished epoch's record; ``stopped`` says the run
    ended early (``stop_at_test_accuracy``), so a rerun trains no more;
    ``data_state`` is the input pipeline's iterator state at ``dispatch``
    (``TrainData.stream``; None at an epoch's start).
    """

    epoch: int = 1
    dispatch: int = 0
    totals: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    record: dict[str, Any] | None = None
    stopped: bool = False
    data_state: dict[str, Any] | None = None

    def save(
        self, run_checkpoints: checkpoints.RunCheckpoints, state: Any, metrics_lines: list[str]
    ) -> None:
        """Checkpoints ``state`` with this position and the lines of ``metrics.jsonl``."""
        progress = dataclasses.asdict(self)
        progress["totals"] = {k: np.asarray(v).tolist() for k, v in self.totals.items()}
        progress["metrics"] = metrics_lines
        run_checkpoints.save(global_step(state), state, progress)

    @classmethod
    def resume(
        cls,
        run_checkpoints: checkpoints.RunCheckpoints,
        state: Any,
        metrics_log: reporting.MetricsLog,
        config: ml_collections.ConfigDict,
    ) -> tuple[Any, RunPosition]:
        """The newest intact checkpoint's state and position, or ``state`` at the start.

        A checkpoint that fails to restore is reported in one line and moved
        to ``damaged_checkpoints/`` beside ``checkpoints/``; the next older
        one is tried. ``metrics.jsonl`` becomes the checkpoint's copy of it
        (rebuilt if it was deleted, torn or edited; checkpoints of earlier
        versions keep the file's records of the epochs before the position):
        later epochs are written again as they are trained again.

        ``config`` is held to the run's identity that the checkpoint saved
        (``check_checkpoint_identity``).

        Raises:
          RunError: there are checkpoints, but none is intact; or ``config``
            computes otherwise than the run they hold.
          checkpoints.IncompatibleCheckpointError: they hold another model.
        """
        workdir = os.path.dirname(run_checkpoints.directory)
        steps = run_checkpoints.all_steps()
        for step in steps:
            try:
                restored, progress = run_checkpoints.restore(step, state)
                failure = None
            except checkpoints.IncompatibleCheckpointError:
                raise
            except Exception as e:  # Orbax, TensorStore and JSON each fail their own way.
                failure = f"{type(e).__name__}: {str(e).replace(chr(10), ' ')}"
            if failure:  # Handled here, after its exception and the reads it holds are freed.
                aside = workdir_lib.not_a_link(
                    workdir_lib.path(workdir, workdir_lib.DAMAGED_CHECKPOINTS)
                )
                moved = run_checkpoints.set_aside(step, aside)
                logging.warning(
                    "The checkpoint at step %d is damaged (%.200s); moved it to %s and trying "
                    "an older one", step, failure, moved,
                )  # fmt: skip
                continue
            check_checkpoint_identity(workdir, config, progress.get("config"))
            fields = {f.name for f in dataclasses.fields(cls)}
            position = cls(**{k: v for k, v in progress.items() if k in fields})
            # Checkpoints of earlier versions hold None at an epoch's start.
            position.totals = {k: np.asarray(v) for k, v in (position.totals or {}).items()}
            if "metrics" in progress:
                metrics_log.restore(progress["metrics"])
            else:
                metrics_log.truncate(position.epoch - 1)
            logging.info(
                "Resuming from the checkpoint at step %d (epoch %d, dispatch %d) in %s",
                step, position.epoch, position.dispatch, run_checkpoints.directory,
            )  # fmt: skip
            return restored, position
        if steps:
            raise RunError(
                f"no intact checkpoint in {run_checkpoints.directory}: the ones of steps "
                f"{', '.join(map(str, steps))} are damaged (set aside in damaged_checkpoints/); "
                "move the workdir away to start afresh"
            )
        metrics_log.truncate(0)
        return state, cls()


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
    what = "preempted" if signum == signal.SIGTERM else "interrupted"
    done = (
        "the run is finished and its outputs are complete"
        if after_training
        else "training had not (re)started, so nothing new was saved; rerun the same command "
        "to go on"
    )
    return Preempted(f"{what} ({signal.Signals(signum).name}) while {phase}; {done}", signum)


def stopped_error(
    signum: int, state: Any, run_checkpoints: checkpoints.RunCheckpoints
) -> Preempted:
    what = "preempted" if signum == signal.SIGTERM else "interrupted"
    return Preempted(
        f"{what} ({signal.Signals(signum).name}) at step {global_step(state)}; saved a "
        f"checkpoint in {run_checkpoints.directory}. Rerun the same command to resume.",
        signum,
    )


def diverged_error(
    step: int, epoch: int, loss: float, max_loss: float,
    run_checkpoints: checkpoints.RunCheckpoints,
) -> DivergedError:  # fmt: skip
    latest = run_checkpoints.latest_step()
    kept = f"the last good checkpoint (step {latest})" if latest is not None else "no checkpoint"
    why = (
        "NaN or Inf" if not np.isfinite(loss) else f"{loss:.4g}, above config.max_loss={max_loss:g}"
    )
    return DivergedError(
        f"the training loss became {why} at step {step} (epoch {epoch}); stopped. "
        f"{kept} is kept in {run_checkpoints.directory}"
    )
