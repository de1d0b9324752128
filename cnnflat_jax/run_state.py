"""Where a run stands, and how it stops and goes on: resume, save, SIGTERM, NaN losses."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cnnflat_jax import checkpoints, reporting


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved and rerunning resumes from it."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


def global_step(state: Any) -> int:
    """The state's step (a population's members step together)."""
    return int(np.max(state.step))


@dataclasses.dataclass
class RunPosition:
    """Where training goes on: at ``dispatch`` of ``epoch``.

    ``totals`` are that epoch's metric sums so far (None at its start);
    ``record`` is the last finished epoch's record; ``stopped`` says the run
    ended early (``stop_at_test_accuracy``), so a rerun trains no more.
    """

    epoch: int = 1
    dispatch: int = 0
    totals: dict[str, np.ndarray] | None = None
    record: dict[str, Any] | None = None
    stopped: bool = False

    def save(self, run_checkpoints: checkpoints.RunCheckpoints, state: Any) -> None:
        """Checkpoints ``state`` with this position."""
        progress = dataclasses.asdict(self)
        if self.totals is not None:
            progress["totals"] = {k: np.asarray(v).tolist() for k, v in self.totals.items()}
        run_checkpoints.save(global_step(state), state, progress)

    @classmethod
    def resume(
        cls,
        run_checkpoints: checkpoints.RunCheckpoints,
        state: Any,
        metrics_log: reporting.MetricsLog,
    ) -> tuple[Any, RunPosition]:
        """The latest checkpoint's state and position, or ``state`` at the start.

        ``metrics.jsonl`` keeps only the records of epochs before the
        position: later ones are written again as they are trained again.
        """
        step = run_checkpoints.latest_step()
        if step is None:
            metrics_log.truncate(0)
            return state, cls()
        state, progress = run_checkpoints.restore(step, state)
        fields = {f.name for f in dataclasses.fields(cls)}
        position = cls(**{k: v for k, v in progress.items() if k in fields})
        if position.totals is not None:
            position.totals = {k: np.asarray(v) for k, v in position.totals.items()}
        metrics_log.truncate(position.epoch - 1)
        logging.info(
            "Resuming from the checkpoint at step %d (epoch %d, dispatch %d) in %s",
            step, position.epoch, position.dispatch, run_checkpoints.directory,
        )  # fmt: skip
        return state, position


@contextlib.contextmanager
def preemption() -> Iterator[Callable[[int], bool]]:
    """Yields ``preempted(step)``: whether SIGTERM has arrived.

    With several processes JAX's preemption sync point makes every process
    agree on the step; one process catches SIGTERM itself, from the main thread.
    """
    if jax.process_count() > 1:
        yield multihost_utils.reached_preemption_sync_point
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: False
        return
    received = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: received.set())
    try:
        yield lambda step: received.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)


def preempted_error(state: Any, run_checkpoints: checkpoints.RunCheckpoints) -> Preempted:
    return Preempted(
        f"preempted (SIGTERM) at step {global_step(state)}; saved a checkpoint in "
        f"{run_checkpoints.directory}. Rerun the same command to resume."
    )


def nonfinite_error(
    step: int, epoch: int, run_checkpoints: checkpoints.RunCheckpoints
) -> NonFiniteLossError:
    latest = run_checkpoints.latest_step()
    kept = f"the last good checkpoint (step {latest})" if latest is not None else "no checkpoint"
    return NonFiniteLossError(
        f"the training loss became NaN or Inf at step {step} (epoch {epoch}); "
        f"stopped. {kept} is kept in {run_checkpoints.directory}"
    )
