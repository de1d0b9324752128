"""Training state, loss, the jitted train/eval steps and the compiled epoch loop.

An epoch's data order is one permutation per epoch (``fold_in(key, epoch)``),
padded to whole batches with masked-out slots, so the last partial batch is
trained on and not dropped. Both loops consume the same plan: the per-step
loop gathers each batch on the host and calls ``train_step``; the compiled
loop keeps the dataset on the device and runs ``steps_per_dispatch`` steps
per XLA program with ``lax.scan``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")


class TrainState(train_state.TrainState):
    """Flax's TrainState: step, params, optimizer state, apply_fn and tx."""


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """SGD with momentum, Adam or AdamW, with a constant or warmup+cosine rate."""
    if config.schedule == "constant":
        learning_rate = config.learning_rate
    elif config.schedule == "warmup_cosine":
        learning_rate = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=config.learning_rate,
            warmup_steps=int(config.warmup_epochs * steps_per_epoch),
            decay_steps=config.num_epochs * steps_per_epoch,
        )
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; choose one of {SCHEDULES}")
    if config.optimizer == "sgd":
        return optax.sgd(learning_rate, momentum=config.momentum or None)
    if config.optimizer == "adam":
        return optax.adam(learning_rate)
    if config.optimizer == "adamw":
        return optax.adamw(learning_rate, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}")


def create_train_state(
    model: nn.Module,
    image_shape: tuple[int, ...],
    tx: optax.GradientTransformation,
    key: jax.Array,
) -> TrainState:
    """Initialises parameters for ``(1, *image_shape)`` inputs and the optimizer."""

    @jax.jit
    def init(key):
        params = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    return init(key)


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 pixels in [0, 255] -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def loss_and_metrics(params: Any, apply_fn: Callable, batch: Batch) -> tuple[jax.Array, Metrics]:
    """Mean softmax cross-entropy over the unmasked examples, and metric sums.

    ``batch["mask"]`` (float, 1 = real example, 0 = padding) weights every
    example, so padded slots affect neither the loss nor the metrics.
    """
    logits = apply_fn({"params": params}, normalize_images(batch["image"]))
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    count = jnp.sum(mask)
    loss = jnp.sum(losses * mask) / jnp.maximum(count, 1.0)
    correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
    metrics = {
        "loss_sum": jnp.sum(losses * mask),
        "correct": jnp.sum(correct * mask),
        "count": count,
    }
    return loss, metrics


def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    grad_fn = jax.grad(loss_and_metrics, has_aux=True)
    grads, metrics = grad_fn(state.params, state.apply_fn, batch)
    return state.apply_gradients(grads=grads), metrics


train_step = jax.jit(_train_step, donate_argnums=0)
train_step.__doc__ = """One optimizer step: ``(state, batch) -> (state, metric sums)``.

``batch`` holds ``image`` (uint8 NHWC), ``label`` (int) and ``mask`` (float);
``state`` is donated. Metric sums: ``loss_sum``, ``correct`` and ``count``.
"""


def epoch_plan(
    key: jax.Array,
    epoch: int,
    num_examples: int,
    batch_size: int,
    steps_per_dispatch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's example order as ``(dispatches, steps_per_dispatch, batch)``.

    Returns:
      ``(indices, mask)``: a permutation of ``range(num_examples)`` drawn from
      ``fold_in(key, epoch)``, padded with index 0 and mask 0 up to whole
      batches and whole dispatches. Steps whose mask is all zero are skipped.
    """
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), num_examples))
    per_dispatch = steps_per_dispatch * batch_size
    padded = -(-num_examples // per_dispatch) * per_dispatch
    indices = np.zeros(padded, np.int32)
    mask = np.zeros(padded, np.float32)
    indices[:num_examples] = perm
    mask[:num_examples] = 1.0
    shape = (padded // per_dispatch, steps_per_dispatch, batch_size)
    return indices.reshape(shape), mask.reshape(shape)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


@functools.partial(jax.jit, donate_argnums=0)
def train_steps(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    mask: jax.Array,
) -> tuple[TrainState, Metrics]:
    """Runs ``indices.shape[0]`` train steps in one XLA program.

    Args:
      state: the train state (donated).
      images, labels: the whole training set, resident on the device.
      indices, mask: ``(steps, batch)`` from ``epoch_plan``; all-masked steps
        leave the state untouched.

    Returns:
      The new state and the metric sums over all steps.
    """

    def body(state, step_plan):
        idx, step_mask = step_plan
        batch = {"image": images[idx], "label": labels[idx], "mask": step_mask}
        return jax.lax.cond(
            jnp.any(step_mask > 0),
            _train_step,
            lambda state, batch: (state, _zero_metrics()),
            state,
            batch,
        )

    state, metrics = jax.lax.scan(body, state, (indices, mask))
    return state, jax.tree.map(jnp.sum, metrics)


def _zero_metrics() -> Metrics:
    zero = jnp.zeros((), jnp.float32)
    return {"loss_sum": zero, "correct": zero, "count": zero}


def per_step_batches(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, mask: np.ndarray
) -> Iterator[Batch]:
    """Host-gathered batches of one dispatch's plan, skipping all-masked steps."""
    for idx, step_mask in zip(indices, mask):
        if step_mask.any():
            yield {"image": images[idx], "label": labels[idx], "mask": step_mask}


@jax.jit
def eval_batches(
    state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array
) -> Metrics:
    """Loss sum, correct count and confusion matrix over ``(batches, B, ...)``.

    Padded examples (mask 0) are excluded. The confusion matrix has true
    labels on rows and predictions on columns.
    """

    def body(totals, batch):
        image, label, batch_mask = batch
        logits = state.apply_fn({"params": state.params}, normalize_images(image))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        predicted = jnp.argmax(logits, axis=-1)
        confusion = totals["confusion"].at[label, predicted].add(batch_mask)
        return {
            "loss_sum": totals["loss_sum"] + jnp.sum(losses * batch_mask),
            "confusion": confusion,
        }, None

    num_classes = jax.eval_shape(
        state.apply_fn, {"params": state.params}, jnp.zeros((1, *images.shape[2:]))
    ).shape[-1]
    totals = {
        "loss_sum": jnp.zeros((), jnp.float32),
        "confusion": jnp.zeros((num_classes, num_classes), jnp.float32),
    }
    totals, _ = jax.lax.scan(body, totals, (images, labels, mask))
    return totals


def eval_arrays(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pads a split to whole batches and puts it on the device, once.

    Returns:
      ``(images, labels, mask)`` shaped ``(batches, batch_size, ...)``; the
      padding has mask 0.
    """
    n = len(images)
    pad = -(-n // batch_size) * batch_size - n
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return (
        jax.device_put(images.reshape(-1, batch_size, *images.shape[1:])),
        jax.device_put(labels.reshape(-1, batch_size)),
        jax.device_put(mask.reshape(-1, batch_size)),
    )


def evaluate(
    state: TrainState,
    arrays: tuple[jax.Array, jax.Array, jax.Array],
    eval_fn: Callable = eval_batches,
) -> dict[str, Any]:
    """Evaluates on every example of ``arrays`` (from ``eval_arrays``).

    ``eval_fn`` may be a compiled ``eval_batches`` (``.lower(...).compile()``).

    Returns:
      ``loss``, ``accuracy``, ``count``, ``per_class_accuracy`` (a list) and
      ``confusion`` (lists; true label by predicted label).
    """
    totals = eval_fn(state, *arrays)
    confusion = np.asarray(totals["confusion"]).astype(np.int64)
    count = int(confusion.sum())
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return {
        "loss": float(totals["loss_sum"]) / count,
        "accuracy": float(np.trace(confusion)) / count,
        "count": count,
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }
