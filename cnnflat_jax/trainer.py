"""``train_and_evaluate``: data -> model -> compiled training -> workdir outputs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from cnnflat_jax import (
    checkpoints,
    hardest,
    input_pipeline,
    models,
    population,
    reporting,
    train_lib,
)

LOOPS = ("compiled", "per_step")
CONFIG_KEYS = frozenset(
    "dataset data_source data_dir idx_dir num_train_examples num_test_examples "
    "validation_examples model optimizer learning_rate momentum weight_decay schedule "
    "warmup_epochs batch_size eval_batch_size num_epochs seed loop steps_per_dispatch "
    "progress_bar stop_at_test_accuracy population per_example".split()
)


class ConfigError(ValueError):
    """A config with an unknown key or an invalid value."""


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
    for key in ("batch_size", "eval_batch_size", "num_epochs", "steps_per_dispatch"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"config.{key} must be an int >= 1, got {config[key]!r}")
    model_fields = dict(config.model)
    try:
        models.create_model(model_fields.pop("name", None), 1, **model_fields)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    try:
        population.check_config(config.population)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


def load_data(config: ml_collections.ConfigDict) -> input_pipeline.Dataset:
    dataset = input_pipeline.load_dataset(
        config.dataset,
        source=config.data_source,
        data_dir=config.data_dir or None,
        idx_dir=config.idx_dir or None,
    )
    return dataset.take(config.num_train_examples, config.num_test_examples)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates ``config``, writing metrics, config and params to ``workdir``.

    Writes ``metrics.jsonl``, ``config.json`` and the final parameters under
    ``final_params/`` (Orbax; stacked along a leading member axis for a
    population). A single model writes one record per epoch; a population
    writes one per member per epoch (with ``member``, its seed and
    hyperparameters) plus one with ``member: "ensemble"``.

    Returns:
      The last epoch's record (for a population, the ensemble's, with
      ``members``: the members' records), plus ``compile_sec`` and ``source``.
    """
    check_config(config)
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    data = load_data(config)
    train_images, train_labels, validation = _hold_out(data, config.validation_examples)
    logging.info(
        "Data: %s from %s: %d train / %d validation / %d test images of %s, %d classes",
        data.name, data.source, len(train_labels), config.validation_examples,
        len(data.test_labels), "x".join(map(str, data.image_shape)), data.num_classes,
    )  # fmt: skip
    model_fields = dict(config.model)
    model = models.create_model(model_fields.pop("name"), data.num_classes, **model_fields)
    num_train = len(train_labels)
    steps = train_lib.steps_per_epoch(num_train, config.batch_size)
    make_tx = train_lib.optimizer_factory(config, steps)
    member_list = population.members(config)
    is_population = config.population.size > 1
    state, mode, data_keys = _initial_state(config, model, data.image_shape, make_tx, member_list)
    num_params = sum(x.size for x in jax.tree.leaves(state.params)) // len(member_list)
    logging.info(
        "Model: %s, %d parameters%s", config.model.name, num_params,
        f", population of {len(member_list)} ({mode} data order)" if is_population else "",
    )  # fmt: skip
    reporting.write_config(workdir, config)

    steps_per_dispatch = min(config.steps_per_dispatch, steps)
    compile_start = time.perf_counter()
    run_dispatch = _compile_train(
        config.loop, mode, state, train_images, train_labels, config.batch_size,
        steps_per_dispatch,
    )  # fmt: skip
    eval_sets = {"test": (data.test_images, data.test_labels)}
    if validation is not None:
        eval_sets["validation"] = validation
    eval_sets = {
        name: train_lib.eval_arrays(*arrays, config.eval_batch_size)
        for name, arrays in eval_sets.items()
    }
    eval_fns = {
        name: train_lib.eval_batches.lower(state, *arrays, population=is_population).compile()
        for name, arrays in eval_sets.items()
    }
    compile_sec = time.perf_counter() - compile_start
    logging.info("Compiled the %s training loop and eval in %.2f s", config.loop, compile_sec)

    metrics_log = reporting.MetricsLog(workdir)
    for epoch in range(1, config.num_epochs + 1):
        plans = [
            train_lib.epoch_plan(key, epoch, num_train, config.batch_size, steps_per_dispatch)
            for key in data_keys
        ]
        indices, mask = population.stack_plans(plans) if mode == "independent" else plans[0]
        state, totals, epoch_sec = _train_epoch(
            run_dispatch, state, indices, mask, steps, epoch, config
        )
        scores = {
            name: train_lib.evaluate(state, eval_sets[name], fn) for name, fn in eval_fns.items()
        }
        # For a population: images trained on by all members together, per second.
        timing = {
            "images_per_sec": float(np.sum(totals["count"])) / epoch_sec,
            "epoch_sec": epoch_sec,
            "elapsed_sec": time.perf_counter() - start,
        }
        if is_population:
            record = population.epoch_record(epoch, state, member_list, totals, scores, timing)
            for member_record in record["members"]:
                metrics_log.write(member_record)
            metrics_log.write({k: v for k, v in record.items() if k != "members"})
        else:
            record = _record(epoch, int(state.step), totals, scores, timing)
            metrics_log.write(record)
        _log_epoch(record, config.num_epochs)
        if 0 < config.stop_at_test_accuracy <= record["test_accuracy"]:
            logging.info("Reached test accuracy %.4f: stopping.", config.stop_at_test_accuracy)
            break

    checkpoints.save_params(os.path.join(workdir, "final_params"), state.params)
    if is_population:
        logging.info("Population summary:\n%s", population.summary(member_list, record))
    if config.per_example.report_hardest:
        report_state = state
        if is_population:
            report_state = population.member_state(state, record.get("best_member", 0))
        hardest.report(
            report_state, train_images, train_labels, workdir,
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


def _hold_out(data: input_pipeline.Dataset, num_validation: int):
    """Splits the last ``num_validation`` training examples off for validation."""
    if num_validation >= len(data.train_labels):
        raise ConfigError(
            f"config.validation_examples={num_validation} leaves no training examples "
            f"(the training set has {len(data.train_labels)})"
        )
    if not num_validation:
        return data.train_images, data.train_labels, None
    cut = len(data.train_labels) - num_validation
    validation = (data.train_images[cut:], data.train_labels[cut:])
    return data.train_images[:cut], data.train_labels[:cut], validation


def _train_epoch(run_dispatch, state, indices, mask, steps, epoch, config):
    """One epoch of dispatches with a progress bar; returns state, metric sums, seconds."""
    totals = None
    bar = reporting.progress_bar(steps, epoch, config.num_epochs, config.progress_bar)
    epoch_start = time.perf_counter()
    for dispatch_indices, dispatch_mask in zip(indices, mask):
        state, metrics = run_dispatch(state, dispatch_indices, dispatch_mask)
        metrics = {
            name: np.asarray(value, np.float64) for name, value in jax.device_get(metrics).items()
        }
        totals = metrics if totals is None else {k: totals[k] + metrics[k] for k in totals}
        bar.set_postfix(
            loss=f"{np.mean(totals['loss_sum'] / totals['count']):.4f}",
            img_s=f"{totals['count'].sum() / (time.perf_counter() - epoch_start):.0f}",
            refresh=False,
        )
        bar.update(int(np.any(dispatch_mask > 0, axis=1).sum()))
    bar.close()
    return state, totals, time.perf_counter() - epoch_start


def _record(epoch, step, totals, scores, timing) -> dict[str, Any]:
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


def _compile_train(
    loop: str,
    mode: str,
    state: train_lib.TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    steps_per_dispatch: int,
) -> Callable:
    """Compiles the training program for ``loop`` and ``mode``.

    Returns:
      ``run(state, indices, mask) -> (state, metric sums)`` for one dispatch
      of ``epoch_plan`` (stacked by ``population.stack_plans`` when independent).
    """
    members = (jax.tree.leaves(state.step)[0].shape or (1,))[0]
    plan_shape = (steps_per_dispatch, members, batch_size) if mode == "independent" else (
        steps_per_dispatch, batch_size
    )  # fmt: skip
    plan = jax.ShapeDtypeStruct(plan_shape, np.int32)
    plan_mask = jax.ShapeDtypeStruct((steps_per_dispatch, batch_size), np.float32)
    if loop == "compiled":
        images_dev, labels_dev = jax.device_put(images), jax.device_put(labels)
        train_steps = train_lib.train_steps.lower(
            state, images_dev, labels_dev, plan, plan_mask, mode=mode
        ).compile()
        return lambda state, indices, mask: train_steps(
            state, images_dev, labels_dev, indices, mask
        )

    batch = {
        "image": jax.ShapeDtypeStruct(plan_shape[1:] + images.shape[1:], images.dtype),
        "label": jax.ShapeDtypeStruct(plan_shape[1:], np.int32),
        "mask": jax.ShapeDtypeStruct((batch_size,), np.float32),
    }
    train_step = train_lib.jitted_step(mode).lower(state, batch).compile()

    def run(state, indices, mask):
        step_metrics = []
        for host_batch in train_lib.per_step_batches(images, labels, indices, mask):
            state, metrics = train_step(state, host_batch)
            step_metrics.append(metrics)
        return state, jax.tree.map(lambda *values: sum(values), *step_metrics)

    return run
