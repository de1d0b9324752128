"""The story of a run: check -> load -> build -> resume -> train epochs -> write outputs."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from cnnflat_jax import config as config_lib
from cnnflat_jax import paths
from cnnflat_jax.data import batching, input_pipeline
from cnnflat_jax.run import checkpoints, lock, outputs, reporting, run_state, signals
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.train import evaluation, programs, sharding, train_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates ``config``, writing its outputs to ``workdir``.

    ``metrics.jsonl`` (a record per epoch; a population's: one per member,
    with its seed and hyperparameters, then ``member: "ensemble"``),
    ``config.json``, ``checkpoints/`` and ``final_params/`` (Orbax; a
    population's stacked on a leading member axis). Rerun on the same
    workdir, it resumes exactly from the latest checkpoint. With several
    processes, process 0 alone writes records and logs progress.

    Returns:
      The last epoch's record (a population's: the ensemble's, its members'
      under ``members``), plus ``compile_sec`` and ``source``.

    Raises:
      config.ConfigError: a bad config, before any data is read.
      workdir.RunError: the workdir is in use, holds a run with another
        config, or has checkpoints but none intact.
      signals.Preempted: SIGTERM or SIGINT arrived; a checkpoint was saved.
      run_state.DivergedError: a NaN, Inf or too large loss; the last good
        checkpoint is kept.
    """
    start = time.perf_counter()
    config_lib.check(config)
    workdir = paths.normal(workdir)  # gs://b//run is gs://b/run: one name for every writer.
    run_state.check_processes_agree(config)
    with (
        signals.stop_signals() as stopping,
        lock.workdir_lock(workdir, config.workdir_lease_sec),
    ):
        return _run(config, workdir, start, stopping)


def _stop_if_asked(stopping: signals.Stopping, phase: str, after_training: bool = False):
    if signum := stopping.now():
        raise signals.stopped_between_phases(signum, phase, after_training)


def _run(
    config: ml_collections.ConfigDict, workdir: str, start: float, stopping: signals.Stopping
) -> dict[str, Any]:
    phases = reporting.Phases()
    with phases("data"):
        mesh = sharding.data_mesh(config.num_devices)
        data_shards = sharding.data_shards(config)
        data = input_pipeline.load_data(config, data_shards)
        _stop_if_asked(stopping, "loading the data")
        config_lib.check_data(config, data.image_shape, data.train_total, data.num_classes)
        train, validation = batching.split_validation(data, config.validation_examples, data_shards)
    reporting.log_data(data, sum(train.shard_sizes), config.validation_examples, mesh, data_shards)

    with phases("build"):
        steps = batching.steps_per_epoch(train.shard_sizes, config.batch_size)
        begun = programs.start(config, data.image_shape, data.num_classes, steps, mesh)
        team, state, data_keys = begun.team, begun.state, begun.data_keys
    reporting.log_model(config.model.name, state.params, team)
    _stop_if_asked(stopping, "building the model")

    lead = jax.process_index() == 0
    with phases("resume"):
        run_checkpoints = checkpoints.RunCheckpoints(
            workdir_lib.not_a_link(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)),
            config.checkpoints_to_keep,
            run_config=config_lib.as_json(config),
            data_contents=data.contents,
        )
        if lead and not run_checkpoints.all_steps():  # A new run: its config is its identity.
            workdir_lib.write_config(workdir, run_checkpoints.run_config)
        learning_rates = train_lib.learning_rates(config, steps, team.members)
        metrics_log = reporting.MetricsLog(workdir, enabled=lead, learning_rates=learning_rates)
        state, position = run_state.RunPosition.resume(run_checkpoints, state, metrics_log, config)

    with phases("compile"):
        steps_per_dispatch = programs.steps_per_dispatch(config, steps)
        train_fn = programs.train_program(config, state, team, mesh, data.image_shape, steps)
        eval_sets = evaluation.eval_splits(
            data, validation, config.eval_batch_size, data_shards, mesh
        )
        eval_fns = programs.eval_programs(state, team, eval_sets)
    compile_sec = phases.seconds["compile"]
    logging.info("Compiled the %s training loop and eval in %.2f s", config.loop, compile_sec)
    _stop_if_asked(stopping, "compiling")

    record = position.record
    epochs = _Epochs(config, train, train_fn, run_checkpoints, metrics_log, stopping.at_step)
    for epoch in range(position.epoch, config.num_epochs + 1) if not position.stopped else ():
        if epoch != position.epoch:
            position = run_state.RunPosition(epoch=epoch, record=record)
        plan = batching.members_plan(
            data_keys, epoch, train.shard_sizes, config.batch_size, steps_per_dispatch
        )
        with phases("train"):
            state, totals, epoch_sec = epochs.train(state, plan, position)
        with phases("eval"):
            scores = {
                name: evaluation.evaluate(state, eval_sets[name], fn, population=team.is_population)
                for name, fn in eval_fns.items()
            }
        timing = {
            # For a population: images trained on by all members together, per second.
            "images_per_sec": float(np.sum(totals["count"])) / epoch_sec,
            "epoch_sec": epoch_sec,
            "elapsed_sec": time.perf_counter() - start,
        }
        step = run_state.global_step(state)
        record = reporting.epoch_record(epoch, step, team, totals, scores, timing)
        with phases("records"):
            metrics_log.write_epoch(record)
        reporting.log_epoch(record, config.num_epochs)
        stopped = 0 < config.stop_at_test_accuracy <= record["test_accuracy"]
        finished = run_state.RunPosition(epoch + 1, 0, {}, record, stopped)
        with phases("checkpoint"):
            finished.save(run_checkpoints, state, metrics_log.lines)
        if stopped:
            logging.info("Reached test accuracy %.4f: stopping.", config.stop_at_test_accuracy)
            break
        if signum := stopping.at_step(step):
            raise signals.stopped_error(signum, step, run_checkpoints.directory)
    with phases("checkpoint"):
        run_checkpoints.close()

    with phases("outputs"):
        outputs.write(config, team, workdir, state, record, data, train, metrics_log, lead)
    _stop_if_asked(stopping, "writing the outputs", after_training=True)
    total = time.perf_counter() - start
    logging.info(
        "Done: %d epochs, %d steps, test accuracy %.4f, %.0f images/s, compile %.2f s,"
        " total %.1f s; outputs in %s",
        record["epoch"], record["step"], record["test_accuracy"],
        record["images_per_sec"], compile_sec, total, workdir,
    )  # fmt: skip
    logging.info("Time: %s; total %.2f s", phases.line(), total)
    return {**record, "compile_sec": compile_sec, "source": data.source}


@dataclasses.dataclass(frozen=True)
class _Epochs:
    """Trains one epoch's dispatches at a time, checkpointing as the config asks."""

    config: ml_collections.ConfigDict
    data: batching.TrainData
    train_fn: Callable
    run_checkpoints: checkpoints.RunCheckpoints
    metrics_log: reporting.MetricsLog
    stopping: Callable[[int], int]

    def train(self, state, plan: batching.Plan, position: run_state.RunPosition):
        """The epoch's dispatches from ``position.dispatch`` on.

        Returns:
          The state, the epoch's metric sums and the seconds it took.
        """
        totals = position.totals
        every = max(1, self.config.checkpoint_every_steps // plan.indices.shape[1])
        lead = jax.process_index() == 0
        bar = reporting.progress_bar(
            plan.steps(), position.epoch, self.config.num_epochs, self.config.progress_bar and lead
        )
        bar.update(plan.steps(slice(0, position.dispatch)))
        epoch_start = time.perf_counter()
        stream = self.data.stream(plan, position.dispatch, position.data_state)
        for d, batches in enumerate(stream, start=position.dispatch):
            step = run_state.global_step(state)
            new_state, metrics, divergence = self.train_fn(state, batches)
            if divergence.diverged:
                raise run_state.diverged_error(
                    step + divergence.step + 1, position.epoch, divergence.loss,
                    self.config.max_loss, self.run_checkpoints,
                )  # fmt: skip
            state = new_state
            totals = {k: totals.get(k, 0) + np.asarray(v, np.float64) for k, v in metrics.items()}
            bar.set_postfix(
                loss=f"{np.mean(totals['loss_sum'] / totals['count']):.4f}",
                img_s=f"{totals['count'].sum() / (time.perf_counter() - epoch_start):.0f}",
                refresh=False,
            )
            bar.update(plan.steps(d))
            if d + 1 == len(plan):
                break
            signum = self.stopping(run_state.global_step(state))
            if signum or (d + 1) % every == 0:
                run_state.RunPosition(
                    position.epoch, d + 1, totals, position.record, data_state=stream.get_state()
                ).save(self.run_checkpoints, state, self.metrics_log.lines)
            if signum:
                raise signals.stopped_error(
                    signum, run_state.global_step(state), self.run_checkpoints.directory
                )
        bar.close()
        return state, totals, time.perf_counter() - epoch_start
