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

from cnnflat_jax import checkpoints, input_pipeline, models, reporting, train_lib

LOOPS = ("compiled", "per_step")
CONFIG_KEYS = frozenset(
    "dataset data_source data_dir idx_dir num_train_examples num_test_examples model "
    "optimizer learning_rate momentum weight_decay schedule warmup_epochs batch_size "
    "eval_batch_size num_epochs seed loop steps_per_dispatch progress_bar "
    "stop_at_test_accuracy".split()
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

    Writes ``metrics.jsonl`` (one object per epoch), ``config.json`` and the
    final parameters under ``final_params/`` (Orbax).

    Returns:
      The last epoch's metrics record, plus ``compile_sec`` and ``source``.
    """
    check_config(config)
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    data = load_data(config)
    logging.info(
        "Data: %s from %s: %d train / %d test images of %s, %d classes",
        data.name, data.source, len(data.train_labels), len(data.test_labels),
        "x".join(map(str, data.image_shape)), data.num_classes,
    )  # fmt: skip
    model_fields = dict(config.model)
    model = models.create_model(model_fields.pop("name"), data.num_classes, **model_fields)
    num_train = len(data.train_labels)
    steps = train_lib.steps_per_epoch(num_train, config.batch_size)
    tx = train_lib.create_optimizer(config, steps)
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    state = train_lib.create_train_state(model, data.image_shape, tx, init_key)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Model: %s, %d parameters", config.model.name, num_params)
    reporting.write_config(workdir, config)

    steps_per_dispatch = min(config.steps_per_dispatch, steps)
    compile_start = time.perf_counter()
    run_dispatch = _compile_train(config.loop, state, data, config.batch_size, steps_per_dispatch)
    eval_data = train_lib.eval_arrays(data.test_images, data.test_labels, config.eval_batch_size)
    eval_fn = train_lib.eval_batches.lower(state, *eval_data).compile()
    compile_sec = time.perf_counter() - compile_start
    logging.info("Compiled the %s training loop and eval in %.2f s", config.loop, compile_sec)

    metrics_log = reporting.MetricsLog(workdir)
    record: dict[str, Any] = {}
    for epoch in range(1, config.num_epochs + 1):
        indices, mask = train_lib.epoch_plan(
            data_key, epoch, num_train, config.batch_size, steps_per_dispatch
        )
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        bar = reporting.progress_bar(steps, epoch, config.num_epochs, config.progress_bar)
        epoch_start = time.perf_counter()
        for dispatch_indices, dispatch_mask in zip(indices, mask):
            state, metrics = run_dispatch(state, dispatch_indices, dispatch_mask)
            for name, value in jax.device_get(metrics).items():
                totals[name] += float(value)
            bar.set_postfix(
                loss=f"{totals['loss_sum'] / totals['count']:.4f}",
                img_s=f"{totals['count'] / (time.perf_counter() - epoch_start):.0f}",
                refresh=False,
            )
            bar.update(int(np.any(dispatch_mask > 0, axis=1).sum()))
        epoch_sec = time.perf_counter() - epoch_start
        bar.close()
        test = train_lib.evaluate(state, eval_data, eval_fn)
        record = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": totals["loss_sum"] / totals["count"],
            "train_accuracy": totals["correct"] / totals["count"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "test_count": test["count"],
            "images_per_sec": totals["count"] / epoch_sec,
            "epoch_sec": epoch_sec,
            "elapsed_sec": time.perf_counter() - start,
            "test_per_class_accuracy": test["per_class_accuracy"],
            "test_confusion": test["confusion"],
        }
        metrics_log.write(record)
        logging.info(
            "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f (%d images)"
            " | %.0f images/s",
            epoch, config.num_epochs, record["train_loss"], record["train_accuracy"],
            test["loss"], test["accuracy"], test["count"], record["images_per_sec"],
        )  # fmt: skip
        if 0 < config.stop_at_test_accuracy <= test["accuracy"]:
            logging.info("Reached test accuracy %.4f: stopping.", config.stop_at_test_accuracy)
            break

    checkpoints.save_params(os.path.join(workdir, "final_params"), state.params)
    summary = {**record, "compile_sec": compile_sec, "source": data.source}
    logging.info(
        "Done: %d epochs, %d steps, test accuracy %.4f, %.0f images/s, compile %.2f s,"
        " total %.1f s; outputs in %s",
        record["epoch"], record["step"], record["test_accuracy"],
        record["images_per_sec"], compile_sec, time.perf_counter() - start, workdir,
    )  # fmt: skip
    return summary


def _compile_train(
    loop: str,
    state: train_lib.TrainState,
    data: input_pipeline.Dataset,
    batch_size: int,
    steps_per_dispatch: int,
) -> Callable:
    """Compiles the training program for ``loop``.

    Returns:
      ``run(state, indices, mask) -> (state, metric sums)`` for one dispatch
      of ``epoch_plan``.
    """
    plan = jax.ShapeDtypeStruct((steps_per_dispatch, batch_size), np.int32)
    plan_mask = jax.ShapeDtypeStruct(plan.shape, np.float32)
    if loop == "compiled":
        images = jax.device_put(data.train_images)
        labels = jax.device_put(data.train_labels)
        train_steps = train_lib.train_steps.lower(state, images, labels, plan, plan_mask).compile()
        return lambda state, indices, mask: train_steps(state, images, labels, indices, mask)

    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *data.image_shape), data.train_images.dtype),
        "label": jax.ShapeDtypeStruct((batch_size,), np.int32),
        "mask": jax.ShapeDtypeStruct((batch_size,), np.float32),
    }
    train_step = train_lib.train_step.lower(state, batch).compile()

    def run(state, indices, mask):
        step_metrics = []
        for host_batch in train_lib.per_step_batches(
            data.train_images, data.train_labels, indices, mask
        ):
            state, metrics = train_step(state, host_batch)
            step_metrics.append(metrics)
        return state, jax.tree.map(lambda *values: sum(values), *step_metrics)

    return run
