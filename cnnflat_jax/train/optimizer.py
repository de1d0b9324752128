"""The optimizer and its schedule: the only part of training that reads the config.

``optimizer_factory`` makes ``make_tx(**hparams)``, so that a population's
members each get their own learning rate, weight decay and momentum;
``config_hparams`` gives one model's from the config, the names
``step.HPARAMS`` lists (``population`` takes every member's from here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from absl import logging

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")


def optimizer_factory(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> Callable[..., optax.GradientTransformation]:
    """``make_tx(**hparams)``: SGD+momentum, Adam or AdamW on a schedule.

    The schedule's shape (``schedule_shape``) is fixed by the config; its
    peak is ``hparams["learning_rate"]``.
    """
    shape = schedule_shape(config, steps_per_epoch)
    total_steps = config.num_epochs * steps_per_epoch
    asked = int(min(config.warmup_epochs, config.num_epochs) * steps_per_epoch)
    if config.schedule == "warmup_cosine" and asked > warmup_steps(config, steps_per_epoch):
        logging.warning(
            "warmup_epochs=%g is more than half of the %d epoch(s): warming up for "
            "%d of the %d steps instead", config.warmup_epochs, config.num_epochs,
            total_steps // 2, total_steps,
        )  # fmt: skip
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}")
    optimizer = config.optimizer

    def make_tx(learning_rate, weight_decay, momentum, **_) -> optax.GradientTransformation:
        def schedule(count):
            return learning_rate * shape(count)

        if optimizer == "sgd":
            return optax.sgd(schedule, momentum=momentum)
        if optimizer == "adam":
            return optax.adam(schedule)
        return optax.adamw(schedule, weight_decay=weight_decay)

    return make_tx


def learning_rates(
    config: ml_collections.ConfigDict, steps_per_epoch: int, member_list: list[dict[str, Any]]
) -> Callable[[int], list[float]]:
    """``step -> [each member's learning rate at that step]`` (one entry for one model)."""
    shape = jax.jit(schedule_shape(config, steps_per_epoch))  # One program, not one per op.
    return lambda step: [member["learning_rate"] * float(shape(step)) for member in member_list]


def schedule_shape(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate's shape over the steps, peaking at 1: constant, or a
    linear warmup then cosine decay to 0. The warmup lasts ``warmup_epochs``,
    but at most half of training, so that any ``num_epochs`` leaves the
    cosine decay steps to take (and a huge ``warmup_epochs`` overflows nothing)."""
    if config.schedule == "constant":
        return optax.constant_schedule(1.0)
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=1.0, warmup_steps=warmup_steps(config, steps_per_epoch),
            decay_steps=config.num_epochs * steps_per_epoch,
        )  # fmt: skip
    raise ValueError(f"unknown schedule {config.schedule!r}; choose one of {SCHEDULES}")


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The warmup's steps: ``warmup_epochs`` of them, at most half of training."""
    total_steps = config.num_epochs * steps_per_epoch
    return min(
        int(min(config.warmup_epochs, config.num_epochs) * steps_per_epoch), total_steps // 2
    )


def config_hparams(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The config's hyperparameters, as ``TrainState.hparams`` holds them."""
    return {
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "momentum": config.momentum,
        "clip_norm": config.per_example.clip_norm,
        "noise_multiplier": config.per_example.noise_multiplier,
    }
