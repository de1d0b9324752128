"""Where a run stands, and how it goes on: the run's identity, its position,
resume past damaged checkpoints, and the stop on a diverging loss.

The lock is ``lock.py``'s, the stop signals ``signals.py``'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from cnnflat_jax import config as config_lib
from cnnflat_jax.errors import Error
from cnnflat_jax.run import checkpoints, reporting
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.run.workdir import RunError


class DivergedError(Error, RuntimeError):
    """The loss became NaN or Inf, or crossed ``config.max_loss``; the last good
    checkpoint is kept."""


def check_identity(
    workdir: str, config: ml_collections.ConfigDict, progress: dict[str, Any], contents: str
) -> None:
    """The one identity gate of a resume: refuses a config that computes
    otherwise than the run in ``workdir``, once its checkpoint restored and
    before anything is written.

    The run's identity is the config that the checkpoint resumed from saved
    in its ``progress`` (its identity fields, ``config.is_identity``), and
    for a folder of pictures their digest (``contents``, now); checkpoints
    of earlier versions saved no config, and then ``config.json`` holds it.
    ``config.json`` is the run's copy for people and tools: unreadable, it
    stops the resume (something damaged the workdir); missing or edited, it
    is written again from the checkpoint.

    Raises:
      RunError: naming every differing field as ``old -> new``; pictures
        that changed; or an unreadable ``config.json``.
    """
    saved_config = progress.get("config")
    path = workdir_lib.not_a_link(workdir_lib.path(workdir, workdir_lib.CONFIG))
    on_disk = _config_json(path)
    if saved_config is None:
        if on_disk is not None:
            _refuse_another_run(workdir, on_disk, config, path)
        return
    _refuse_another_run(workdir, saved_config, config, "saved in its checkpoints")
    if progress.get("data_contents", "") not in ("", contents):
        raise RunError(
            f"{workdir} holds a run on other pictures: those of config.dataset="
            f"{config.dataset} were added, removed or changed since it started. Restore "
            "them to resume it, or start a new run with another --workdir"
        )
    if on_disk != saved_config and jax.process_index() == 0:
        logging.warning("%s was missing or edited; rebuilt it from the checkpoint", path)
        workdir_lib.write_json(path, saved_config)


def _config_json(path: str) -> dict[str, Any] | None:
    """``config.json``'s content; None if there is none."""
    try:
        content = json.loads(workdir_lib.read_bytes(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable ({e}); it describes the run to resume") from None
    if not isinstance(content, dict):
        raise RunError(f"{path} is unreadable (not a JSON object); it describes the run to resume")
    return content


def _refuse_another_run(
    workdir: str, saved_config: dict[str, Any], config: ml_collections.ConfigDict, source: str
) -> None:
    """Raises ``RunError`` naming each identity field where ``config`` differs
    from ``saved_config`` (the run's own, read from ``source``)."""
    old = config_lib.flat_fields(saved_config)
    new = config_lib.flat_fields(config_lib.as_json(config))
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


def check_processes_agree(config: ml_collections.ConfigDict) -> None:
    """Every process of a multi-process run holds one run identity: each
    gathers every process's identity fields, before any data is read or any
    step runs (other configs would train apart, deadlock or crash in a
    collective), and all of them refuse alike.

    Raises:
      RunError: naming the first process whose identity differs from process
        0's, and each differing field.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    identity = {
        key: value
        for key, value in config_lib.flat_fields(config_lib.as_json(config)).items()
        if config_lib.is_identity(key)
    }
    text = np.frombuffer(json.dumps(identity, sort_keys=True).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.array(len(text), np.int32))))
    padded = np.zeros(longest, np.uint8)
    padded[: len(text)] = text
    every = multihost_utils.process_allgather(padded)
    first = json.loads(bytes(every[0]).rstrip(b"\0"))
    for process, row in enumerate(every[1:], start=1):
        other = json.loads(bytes(row).rstrip(b"\0"))
        changed = [
            f"{key} {config_lib.show(first.get(key))} -> {config_lib.show(other.get(key))}"
            for key in sorted(set(first) | set(other))
            if first.get(key) != other.get(key)
        ]
        if changed:
            raise RunError(
                f"the processes of this run were given other configs: process {process} "
                f"differs from process 0 in {'; '.join(changed)}; give every process the same "
                "--config and --config.FIELD flags"
            )


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

        ``config`` is held to the run's identity (``check_identity``) once a
        checkpoint restored: another model's shapes are named first.

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
            check_identity(workdir, config, progress, run_checkpoints.data_contents)
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
