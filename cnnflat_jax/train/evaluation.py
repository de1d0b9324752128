"""Eval: the eval splits on the mesh, loss and confusion sums in one program, scores."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cnnflat_jax.data import batching, input_pipeline, shards
from cnnflat_jax.train import sharding
from cnnflat_jax.train.train_lib import Metrics, TrainState, normalize_images


def eval_splits(
    data: input_pipeline.Dataset,
    validation: tuple[np.ndarray, np.ndarray] | None,
    batch_size: int,
    data_shards: int,
    mesh: Mesh,
) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    """The test split and the validation split (when held out) as global
    ``(batches, batch, ...)`` arrays, every process with the same batch count."""
    splits = {"test": (data.test_images, data.test_labels, data.test_total)}
    if validation is not None:
        splits["validation"] = (*validation, len(validation[1]) * jax.process_count())
    processes = jax.process_count()
    arrays = {}
    for name, (images, labels, total) in splits.items():
        part_bounds = shards.shard_bounds(total, data_shards)[:: data_shards // processes]
        num_batches = -(-int(np.diff(part_bounds).max()) // (batch_size // processes))
        local = batching.eval_arrays(images, labels, batch_size // processes, num_batches)
        arrays[name] = tuple(
            sharding.global_array(x, sharding.batch_sharding(mesh, 1)) for x in local
        )
    return arrays


@functools.partial(jax.jit, static_argnames="population")
def eval_batches(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    population: bool = False,
) -> Metrics:
    """Loss sums and confusion matrices over ``(batches, B, ...)``.

    Padded examples (mask 0) are excluded. Confusion matrices have true labels
    on rows and predictions on columns. For a population (a stacked state)
    ``loss_sum`` is ``(K,)`` and ``confusion`` ``(K, C, C)``, and the
    ``ensemble_*`` entries score the members' averaged logits.
    """

    def logits_of(image):
        def apply(state):
            return state.apply_fn({"params": state.params}, normalize_images(image))

        return jax.vmap(apply)(state) if population else apply(state)

    def scores(logits, label, batch_mask):
        label = jnp.broadcast_to(label, logits.shape[:-1])
        mask = jnp.broadcast_to(batch_mask, label.shape)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        num_classes = logits.shape[-1]
        true = jax.nn.one_hot(label, num_classes) * mask[..., None]
        predicted = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes)
        confusion = jnp.einsum("...bi,...bj->...ij", true, predicted)
        return jnp.sum(losses * mask, axis=-1), confusion

    def batch_totals(batch):
        image, label, batch_mask = batch
        logits = logits_of(image)
        loss_sum, confusion = scores(logits, label, batch_mask)
        totals = {"loss_sum": loss_sum, "confusion": confusion}
        if population:
            ensemble = scores(jnp.mean(logits, axis=0), label, batch_mask)
            totals["ensemble_loss_sum"], totals["ensemble_confusion"] = ensemble
        return totals

    def body(totals, batch):
        return jax.tree.map(jnp.add, totals, batch_totals(batch)), None

    shapes = jax.eval_shape(batch_totals, (images[0], labels[0], mask[0]))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    return jax.lax.scan(body, zeros, (images, labels, mask))[0]


def evaluate(
    state: TrainState,
    arrays: tuple[jax.Array, jax.Array, jax.Array],
    eval_fn: Callable | None = None,
    *,
    population: bool = False,
) -> dict[str, Any]:
    """Evaluates on every example of ``arrays`` (from ``batching.eval_arrays``).

    ``eval_fn`` may be ``eval_batches`` compiled (``.lower(...).compile()``)
    with the same ``population``; by default it is ``eval_batches``.

    Returns:
      ``loss``, ``accuracy``, ``count``, ``per_class_accuracy`` (a list) and
      ``confusion`` (lists; true label by predicted label). For a population:
      ``{"members": [one such dict per member], "ensemble": the averaged-logits
      dict}``.
    """
    eval_fn = eval_fn or functools.partial(eval_batches, population=population)
    totals = jax.device_get(eval_fn(state, *arrays))
    if not population:
        return score_confusion(totals["confusion"], totals["loss_sum"])
    members = [
        score_confusion(confusion, loss)
        for confusion, loss in zip(totals["confusion"], totals["loss_sum"])
    ]
    ensemble = score_confusion(totals["ensemble_confusion"], totals["ensemble_loss_sum"])
    return {"members": members, "ensemble": ensemble}


@functools.partial(jax.jit, static_argnums=0)
def _logits(apply_fn: Callable, params: Any, images: jax.Array) -> jax.Array:
    return apply_fn({"params": params}, normalize_images(images))


def predict(apply_fn: Callable, params: Any, images: np.ndarray, batch_size: int = 1000):
    """Predicted labels of one model for host images, on this process's first device."""
    params = jax.device_get(params)
    batches = range(0, len(images), batch_size)
    return np.concatenate(
        [
            np.asarray(_logits(apply_fn, params, images[i : i + batch_size])).argmax(-1)
            for i in batches
        ]
    )


def score_confusion(confusion: np.ndarray, loss_sum: float) -> dict[str, Any]:
    """Accuracy, per-class accuracy and mean loss from a confusion matrix."""
    confusion = np.asarray(confusion).round().astype(np.int64)
    count = int(confusion.sum())
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return {
        "loss": float(loss_sum) / count,
        "accuracy": float(np.trace(confusion)) / count,
        "count": count,
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }
