"""``train_and_evaluate``: data -> model -> compiled training -> workdir outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cnnflat_jax import (
    checkpoints,
    hardest,
    input_pipeline,
    models,
    plots,
    population,
    reporting,
    sharding,
    train_lib,
    transforms,
)

LOOPS = ("compiled", "per_step")
CONFIG_KEYS = frozenset(
    "dataset data_source data_dir idx_dir num_train_examples num_test_examples "
    "validation_examples model optimizer learning_rate momentum weight_decay schedule "
    "warmup_epochs batch_size eval_batch_size num_epochs seed loop steps_per_dispatch "
    "progress_bar stop_at_test_accuracy population per_example num_devices data_shards "
    "checkpoint_every_steps checkpoints_to_keep permute_pixels".split()
)


class ConfigError(ValueError):
    """A config with an unknown key or an invalid value."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved and rerunning resumes from it."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first unknown key or invalid value."""
    unknown = sorted(set(config.keys()) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(CONFIG_KEYS)}")
    missing = sorted(CONFIG_KEYS - set(config.keys()))
    if missing:
        raise ConfigError(f"config is missing key(s) {missing}")
    choices = {
        "data_source": input_pipeline.SOURCES,
        "optimizer": train_lib.OPTIMIZERS,
        "schedule": train_lib.SCHEDULES,
        "loop": LOOPS,
    }
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise ConfigError(f"config.{key}={config[key]!r}; choose one of {allowed}")
    for key in (
        "batch_size", "eval_batch_size", "num_epochs", "steps_per_dispatch",
        "checkpoint_every_steps", "checkpoints_to_keep",
    ):  # fmt: skip
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"config.{key} must be an int >= 1, got {config[key]!r}")
    for key in ("num_devices", "data_shards"):
        if not isinstance(config[key], int) or config[key] < 0:
            raise ConfigError(
                f"config.{key} must be an int >= 0 (0 = automatic), got {config[key]!r}"
            )
    if config.schedule == "warmup_cosine" and not 0 <= config.warmup_epochs < config.num_epochs:
        raise ConfigError(
            f"config.warmup_epochs={config.warmup_epochs} must be >= 0 and less than "
            f"config.num_epochs={config.num_epochs}, or the cosine decay has no steps"
        )
    try:
        models.from_fields(config.model, 1)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    try:
        population.check_config(config.population)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


def _mesh_and_shards(config: ml_collections.ConfigDict):
    """The ``data`` mesh and the number of data shards, checked against the batch sizes."""
    devices = jax.device_count()
    if config.num_devices not in (0, devices) and jax.process_count() > 1:
        raise ConfigError("config.num_devices must be 0 (all devices) in a multi-process run")
    if config.num_devices > devices:
        raise ConfigError(f"config.num_devices={config.num_devices}, but only {devices} exist")
    mesh = sharding.data_mesh(config.num_devices or devices)
    data_shards = config.data_shards or jax.process_count()
    try:
        sharding.process_shards(data_shards)
        sharding.check_divisible(config.batch_size, "config.batch_size", mesh, data_shards)
        sharding.check_divisible(
            config.eval_batch_size, "config.eval_batch_size", mesh, jax.process_count()
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.per_example.report_hardest and jax.process_count() > 1:
        raise ConfigError("config.per_example.report_hardest runs on one process only")
    return mesh, data_shards


def load_data(config: ml_collections.ConfigDict, data_shards: int) -> input_pipeline.Dataset:
    """This process's part of the dataset (see ``sharding``)."""
    part = input_pipeline.Part(
        num_train=config.num_train_examples,
        num_test=config.num_test_examples,
        shard_count=data_shards,
        shards=sharding.process_shards(data_shards),
    )
    return input_pipeline.load_dataset(
        config.dataset,
        source=config.data_source,
        data_dir=config.data_dir or None,
        idx_dir=config.idx_dir or None,
        part=part,
    )


@dataclasses.dataclass(frozen=True)
class TrainData:
    """This process's training examples and where they sit in the global order.

    ``shard_sizes`` are the training sizes of all data shards (every
    process's); this process's shards start at ``offset`` in the
    concatenated order that ``train_lib.epoch_plan`` indexes.
    """

    images: np.ndarray
    labels: np.ndarray
    shard_sizes: list[int]
    offset: int

    def local(self, indices: np.ndarray, batch_size: int) -> np.ndarray:
        """This process's columns of a global plan, as indices into ``images``."""
        return indices[..., sharding.process_columns(batch_size)] - self.offset


def _split_validation(data: input_pipeline.Dataset, num_validation: int, data_shards: int):
    """Holds out the last ``num_validation / data_shards`` examples of every shard.

    Returns:
      ``(TrainData, (images, labels) of the validation part, or None)``.
    """
    if num_validation % data_shards:
        raise ConfigError(
            f"config.validation_examples={num_validation} is not divisible by the "
            f"{data_shards} data shards"
        )
    per_shard = num_validation // data_shards
    bounds = sharding.shard_bounds(data.train_total, data_shards)
    sizes = np.diff(bounds) - per_shard
    if sizes.min() < 1:
        raise ConfigError(
            f"config.validation_examples={num_validation} leaves no training examples "
            f"(the training set has {data.train_total})"
        )
    shards = sharding.process_shards(data_shards)
    starts = bounds[shards.start : shards.stop] - bounds[shards.start]
    keep = np.concatenate([np.arange(start, start + sizes[s]) for start, s in zip(starts, shards)])
    held = np.setdiff1d(np.arange(len(data.train_labels)), keep)
    offset = int(sizes[: shards.start].sum())
    train = TrainData(data.train_images[keep], data.train_labels[keep], sizes.tolist(), offset)
    validation = (data.train_images[held], data.train_labels[held]) if per_shard else None
    return train, validation


def _eval_arrays(images, labels, total, batch_size, data_shards, mesh):
    """This process's part of an eval split as global ``(batches, batch, ...)`` arrays."""
    processes = jax.process_count()
    part_bounds = sharding.shard_bounds(total, data_shards)[:: data_shards // processes]
    num_batches = -(-int(np.diff(part_bounds).max()) // (batch_size // processes))
    local = train_lib.eval_arrays(images, labels, batch_size // processes, num_batches)
    return tuple(sharding.global_array(x, sharding.batch_sharding(mesh, 1)) for x in local)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates ``config``, writing metrics, config and params to ``workdir``.

    Writes ``metrics.jsonl``, ``config.json``, checkpoints under
    ``checkpoints/`` and the final parameters under ``final_params/``
    (Orbax; stacked along a leading member axis for a population). Rerun with
    the same workdir and it resumes from the latest checkpoint, exactly. A
    single model writes one record per epoch; a population one per member per
    epoch (with ``member``, its seed and hyperparameters) plus one with
    ``member: "ensemble"``. With several processes, process 0 alone writes
    records and logs progress.

    Returns:
      The last epoch's record (for a population, the ensemble's, with
      ``members``: the members' records), plus ``compile_sec`` and ``source``.

    Raises:
      ConfigError: a bad config. Preempted: SIGTERM arrived; a checkpoint was
      saved. NonFiniteLossError: a NaN or Inf loss; the last good checkpoint
      is kept. checkpoints.IncompatibleCheckpointError: the workdir holds a
      checkpoint of another model.
    """
    check_config(config)
    start = time.perf_counter()
    mesh, data_shards = _mesh_and_shards(config)
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    data = load_data(config, data_shards)
    if config.permute_pixels:
        data = dataclasses.replace(
            data,
            train_images=transforms.permute_pixels(data.train_images),
            test_images=transforms.permute_pixels(data.test_images),
        )
    train, validation = _split_validation(data, config.validation_examples, data_shards)
    logging.info(
        "Data: %s from %s: %d train / %d validation / %d test images of %s, %d classes; "
        "%d device(s), %d data shard(s)",
        data.name, data.source, sum(train.shard_sizes), config.validation_examples,
        data.test_total, "x".join(map(str, data.image_shape)), data.num_classes, mesh.size,
        data_shards,
    )  # fmt: skip
    model = models.from_fields(config.model, data.num_classes)
    steps = train_lib.steps_per_epoch(train.shard_sizes, config.batch_size)
    make_tx = train_lib.optimizer_factory(config, steps)
    member_list = population.members(config)
    is_population = config.population.size > 1
    state, mode, data_keys = _initial_state(config, model, data.image_shape, make_tx, member_list)
    state = sharding.replicate(state, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params)) // len(member_list)
    logging.info(
        "Model: %s, %d parameters%s", config.model.name, num_params,
        f", population of {len(member_list)} ({mode} data order)" if is_population else "",
    )  # fmt: skip
    if lead:
        reporting.write_config(workdir, config)
    metrics_log = reporting.MetricsLog(workdir, enabled=lead)
    run_checkpoints = checkpoints.RunCheckpoints(
        os.path.join(workdir, "checkpoints"), config.checkpoints_to_keep
    )
    state, position = _resume(run_checkpoints, state, metrics_log)

    steps_per_dispatch = min(config.steps_per_dispatch, steps)
    compile_start = time.perf_counter()
    run_dispatch = _compile_train(config.loop, mode, state, mesh, train, config.batch_size,
                                  steps_per_dispatch)  # fmt: skip
    eval_sets = {"test": (data.test_images, data.test_labels, data.test_total)}
    if validation is not None:
        eval_sets["validation"] = (*validation, config.validation_examples)
    eval_sets = {
        name: _eval_arrays(*arrays, config.eval_batch_size, data_shards, mesh)
        for name, arrays in eval_sets.items()
    }
    eval_fns = {
        name: train_lib.eval_batches.lower(state, *arrays, population=is_population).compile()
        for name, arrays in eval_sets.items()
    }
    compile_sec = time.perf_counter() - compile_start
    logging.info("Compiled the %s training loop and eval in %.2f s", config.loop, compile_sec)

    record = position["record"]
    epochs = range(position["epoch"], config.num_epochs + 1)
    with _preemption() as preempted:
        for epoch in [] if position["stopped"] else epochs:
            plans = [
                train_lib.epoch_plan(key, epoch, train.shard_sizes, config.batch_size,
                                     steps_per_dispatch)
                for key in data_keys
            ]  # fmt: skip
            plan = population.stack_plans(plans) if mode == "independent" else plans[0]
            resumed = position if epoch == position["epoch"] else {"dispatch": 0, "totals": None}
            state, totals, epoch_sec = _train_epoch(
                run_dispatch, state, plan, resumed, epoch, config, run_checkpoints, preempted,
                record,
            )  # fmt: skip
            scores = {
                name: train_lib.evaluate(state, eval_sets[name], fn)
                for name, fn in eval_fns.items()
            }
            timing = {
                # For a population: images trained on by all members together, per second.
                "images_per_sec": float(np.sum(totals["count"])) / epoch_sec,
                "epoch_sec": epoch_sec,
                "elapsed_sec": time.perf_counter() - start,
            }
            record = _record(epoch, state, member_list, totals, scores, timing, is_population)
            metrics_log.write_epoch(record)
            _log_epoch(record, config.num_epochs)
            stopped = 0 < config.stop_at_test_accuracy <= record["test_accuracy"]
            _save(run_checkpoints, state, epoch + 1, 0, None, record, stopped)
            if stopped:
                logging.info("Reached test accuracy %.4f: stopping.", config.stop_at_test_accuracy)
                break
            if preempted(int(np.max(state.step))):
                raise Preempted(_preempted_message(state, run_checkpoints))
    run_checkpoints.close()

    checkpoints.save_params(os.path.join(workdir, "final_params"), state.params)
    # One model's figures: a population's best member by validation, else member 0.
    shown = population.member_state(state, record.get("best_member", 0)) if is_population else state
    if lead:
        if is_population:
            logging.info("Population summary:\n%s", population.summary(member_list, record))
        predicted = train_lib.predict(shown.apply_fn, shown.params, data.test_images)
        confusion = np.asarray(_shown_record(record)["test_confusion"])
        plots.write_run_figures(
            workdir, metrics_log.read(), confusion, data.test_images, data.test_labels, predicted
        )
    if config.per_example.report_hardest:
        hardest.report(
            shown, train.images, train.labels, workdir,
            num_shown=config.per_example.report_hardest,
            num_scanned=config.per_example.report_scan_examples,
        )  # fmt: skip
    logging.info(
        "Done: %d epochs, %d steps, test accuracy %.4f, %.0f images/s, compile %.2f s,"
        " total %.1f s; outputs in %s",
        record["epoch"], record["step"], record["test_accuracy"],
        record["images_per_sec"], compile_sec, time.perf_counter() - start, workdir,
    )  # fmt: skip
    return {**record, "compile_sec": compile_sec, "source": data.source}


def _initial_state(config, model, image_shape, make_tx, member_list):
    """The (stacked, for a population) initial state, step mode and data-order keys."""
    clip = config.per_example.clip_norm > 0
    if config.population.size > 1:
        state = population.create_population(model, image_shape, make_tx, member_list, clip)
        mode = "independent" if config.population.independent_data_order else "shared"
    else:
        key = population.run_keys(config.seed)[0]
        state = train_lib.create_train_state(model, image_shape, make_tx, member_list[0], key, clip)
        mode = "single"
    # Data order: one per member, else the order a single run with config.seed uses.
    seeds = [m["seed"] for m in member_list] if mode == "independent" else [config.seed]
    return state, mode, [population.run_keys(seed)[1] for seed in seeds]


def _resume(run_checkpoints, state, metrics_log):
    """The latest checkpoint's state and position, or the fresh state at epoch 1."""
    fresh = {"epoch": 1, "dispatch": 0, "totals": None, "record": None, "stopped": False}
    step = run_checkpoints.latest_step()
    if step is None:
        metrics_log.truncate(0)
        return state, fresh
    state, position = run_checkpoints.restore(step, state)
    if position["totals"] is not None:
        position["totals"] = {k: np.asarray(v) for k, v in position["totals"].items()}
    # Records of epochs after the checkpoint are rewritten as they are trained again.
    metrics_log.truncate(position["epoch"] - 1)
    logging.info(
        "Resuming from the checkpoint at step %d (epoch %d, dispatch %d) in %s",
        step, position["epoch"], position["dispatch"], run_checkpoints.directory,
    )  # fmt: skip
    return state, position


def _save(run_checkpoints, state, epoch, dispatch, totals, record, stopped=False):
    """Checkpoints ``state``; training goes on at ``dispatch`` of ``epoch``."""
    progress = {
        "epoch": epoch,
        "dispatch": dispatch,
        "totals": None if totals is None else {k: v.tolist() for k, v in totals.items()},
        "record": record,
        "stopped": stopped,
    }
    run_checkpoints.save(int(np.max(state.step)), state, progress)


@contextlib.contextmanager
def _preemption() -> Iterator[Callable[[int], bool]]:
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


def _preempted_message(state, run_checkpoints) -> str:
    return (
        f"preempted (SIGTERM) at step {int(np.max(state.step))}; saved a checkpoint in "
        f"{run_checkpoints.directory}. Rerun the same command to resume."
    )


def _train_epoch(run_dispatch, state, plan, resumed, epoch, config, run_checkpoints, preempted,
                 last_record):  # fmt: skip
    """One epoch of dispatches from ``resumed["dispatch"]`` on, with checkpoints.

    Returns:
      The state, the epoch's metric sums and the seconds it took.
    """
    indices, mask = plan
    totals = resumed["totals"]
    every = max(1, config.checkpoint_every_steps // indices.shape[1])
    lead = jax.process_index() == 0
    bar = reporting.progress_bar(
        int(np.any(mask > 0, axis=2).sum()), epoch, config.num_epochs, config.progress_bar and lead
    )
    bar.update(int(np.any(mask[: resumed["dispatch"]] > 0, axis=2).sum()))
    epoch_start = time.perf_counter()
    for d in range(resumed["dispatch"], len(indices)):
        step = int(np.max(state.step))
        new_state, metrics = run_dispatch(state, indices[d], mask[d])
        metrics = jax.device_get(metrics)
        bad = int(np.max(metrics.pop("first_nonfinite_step")))
        if bad >= 0:
            latest = run_checkpoints.latest_step()
            kept = (
                f"the last good checkpoint (step {latest})"
                if latest is not None
                else "no checkpoint"
            )
            raise NonFiniteLossError(
                f"the training loss became NaN or Inf at step {step + bad + 1} (epoch {epoch}); "
                f"stopped. {kept} is kept in {run_checkpoints.directory}"
            )
        state = new_state
        metrics = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
        totals = metrics if totals is None else {k: totals[k] + metrics[k] for k in totals}
        bar.set_postfix(
            loss=f"{np.mean(totals['loss_sum'] / totals['count']):.4f}",
            img_s=f"{totals['count'].sum() / (time.perf_counter() - epoch_start):.0f}",
            refresh=False,
        )
        bar.update(int(np.any(mask[d] > 0, axis=1).sum()))
        if d + 1 == len(indices):
            break
        stop = preempted(int(np.max(state.step)))
        if stop or (d + 1) % every == 0:
            _save(run_checkpoints, state, epoch, d + 1, totals, last_record)
        if stop:
            raise Preempted(_preempted_message(state, run_checkpoints))
    bar.close()
    return state, totals, time.perf_counter() - epoch_start


def _shown_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record of the model the figures show (see ``train_and_evaluate``)."""
    if "members" not in record:
        return record
    return record["members"][record.get("best_member", 0)]


def _record(epoch, state, member_list, totals, scores, timing, is_population) -> dict[str, Any]:
    if is_population:
        return population.epoch_record(epoch, state, member_list, totals, scores, timing)
    step = int(state.step)
    return {"epoch": epoch, "step": step, **reporting.scores_record(totals, scores), **timing}


def _log_epoch(record: dict[str, Any], num_epochs: int) -> None:
    who = "ensemble " if record.get("member") == "ensemble" else ""
    train = "" if who else (
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
    )  # fmt: skip
    validation = (
        f" | validation acc {record['validation_accuracy']:.4f}"
        if "validation_accuracy" in record else ""
    )  # fmt: skip
    logging.info(
        "epoch %d/%d: %s%stest loss %.4f acc %.4f (%d images)%s | %.0f images/s",
        record["epoch"], num_epochs, train, who, record["test_loss"], record["test_accuracy"],
        record["test_count"], validation, record["images_per_sec"],
    )  # fmt: skip


def _compile_train(loop, mode, state, mesh, train: TrainData, batch_size, steps_per_dispatch):
    """Compiles the training program for ``loop`` and ``mode`` with explicit shardings.

    Returns:
      ``run(state, indices, mask) -> (state, metric sums)`` for one dispatch
      of the global ``epoch_plan`` (stacked by ``population.stack_plans``
      when independent). Each process gathers its own columns of the batch
      on the host; the sums include ``first_nonfinite_step`` (-1: none).
    """
    independent = mode == "independent"
    columns = sharding.process_columns(batch_size)
    replicated = sharding.replicated(mesh)
    members = jax.tree.leaves(state.step)[0].shape[:1] if independent else ()
    lead_shape = (steps_per_dispatch, *members, batch_size)
    batch_axis = len(lead_shape) - 1  # Of the (steps, [K,] batch) leading axes.
    if loop == "per_step":
        lead_shape, batch_axis = lead_shape[1:], batch_axis - 1
    shardings = {
        "image": sharding.batch_sharding(mesh, batch_axis),
        "label": sharding.batch_sharding(mesh, batch_axis),
        "mask": sharding.batch_sharding(mesh, batch_axis - len(members)),
    }
    abstract = {
        "image": jax.ShapeDtypeStruct(lead_shape + train.images.shape[1:], train.images.dtype),
        "label": jax.ShapeDtypeStruct(lead_shape, train.labels.dtype),
        "mask": jax.ShapeDtypeStruct(lead_shape[: -1 - len(members)] + lead_shape[-1:], np.float32),
    }
    abstract = {k: v.update(sharding=shardings[k]) for k, v in abstract.items()}
    compiled = train_lib.sharded_step(mode, replicated, shardings, scan=loop == "compiled")
    compiled = compiled.lower(state, abstract).compile()

    def global_batch(host_batch):
        return {k: sharding.global_array(v, shardings[k]) for k, v in host_batch.items()}

    def host_batches(indices, mask):
        local = train.local(indices, batch_size)
        return train_lib.gather_batches(train.images, train.labels, local, mask[..., columns])

    if loop == "compiled":
        return lambda state, indices, mask: compiled(
            state, global_batch(host_batches(indices, mask))
        )

    def run(state, indices, mask):
        batches = host_batches(indices, mask)
        totals, first_nonfinite = None, -1
        for t in np.flatnonzero(np.any(mask > 0, axis=-1)):
            batch = {k: v[t] for k, v in batches.items()}
            state, metrics = compiled(state, global_batch(batch))
            metrics = jax.device_get(metrics)
            if first_nonfinite < 0 and not np.all(np.isfinite(metrics["loss_sum"])):
                first_nonfinite = int(t)
            totals = metrics if totals is None else jax.tree.map(np.add, totals, metrics)
        return state, {**totals, "first_nonfinite_step": np.int32(first_nonfinite)}

    return run
