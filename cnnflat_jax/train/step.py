"""The training state, the loss and the pure train step.

``train_step`` is one step of one model; ``STEP_FNS`` vmaps it for a
population. ``train_lib.build_train`` compiles them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from cnnflat_jax.data import transforms
from cnnflat_jax.train import per_example

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# The hyperparameters a state holds (``TrainState.hparams``), one value each per member.
HPARAMS = ("learning_rate", "weight_decay", "momentum", "clip_norm", "noise_multiplier")


class TrainState(struct.PyTreeNode):
    """Step, parameters, optimizer state, hyperparameters and a PRNG key.

    ``hparams`` (see ``HPARAMS``) are arrays rather than Python constants, so
    a vmapped population can give each member its own; the optimizer is
    rebuilt from them by ``make_tx`` inside the step. ``key`` seeds per-step
    randomness as ``fold_in(key, step)``. ``clip_per_example`` turns on the
    DP-SGD update (per-example clipping by ``clip_norm`` plus Gaussian noise
    of std ``noise_multiplier * clip_norm``). ``max_shift`` > 0 moves every
    training image by a random shift of up to that many pixels each step
    (``transforms.random_shift``).
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    hparams: dict[str, jax.Array]
    key: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    make_tx: Callable[..., optax.GradientTransformation] = struct.field(pytree_node=False)
    clip_per_example: bool = struct.field(pytree_node=False, default=False)
    max_shift: int = struct.field(pytree_node=False, default=0)

    def apply_gradients(self, grads: Any) -> TrainState:
        tx = self.make_tx(**self.hparams)
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def create_train_state(
    model: nn.Module,
    image_shape: tuple[int, ...],
    make_tx: Callable[..., optax.GradientTransformation],
    hparams: dict[str, Any],
    key: jax.Array,
    clip_per_example: bool = False,
    max_shift: int = 0,
    compute_dtype: str = "float32",
) -> TrainState:
    """Initialises parameters for ``(1, *image_shape)`` inputs and the optimizer.

    ``key`` is split into the initialisation key and the state's own key.
    Works under ``jax.vmap`` over ``hparams`` and ``key`` (a population).
    The model computes in ``compute_dtype`` (``ComputeIn``).
    """

    # The initialisation runs once, so XLA need not optimise it: on CPU that
    # cuts its compile time from ~2 s to ~0.4 s. Its values differ from an
    # optimised build's by at most one rounding step (~4% of the weights),
    # and are the same on every run.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None

    @functools.partial(jax.jit, compiler_options=options)
    def init(key, hparams):
        init_key, state_key = jax.random.split(key)
        params = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
        hparams = {name: jnp.asarray(hparams[name], jnp.float32) for name in HPARAMS}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=make_tx(**hparams).init(params),
            hparams=hparams,
            key=state_key,
            apply_fn=ComputeIn(model.apply, compute_dtype),
            make_tx=make_tx,
            clip_per_example=clip_per_example,
            max_shift=max_shift,
        )

    return init(key, hparams)


COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ComputeIn:
    """``apply_fn`` computing in ``dtype``: the parameters and inputs are cast to
    it on the way in, the logits back to float32 on the way out. Parameters,
    gradients (the cast's transpose casts them back), optimizer state, the
    loss and every metric sum stay float32: mixed precision as TPUs want it
    (their matrix units take bfloat16 and accumulate in float32)."""

    apply_fn: Callable
    dtype: str = "float32"

    def __call__(self, variables: Any, images: jax.Array, **kwargs) -> jax.Array:
        if self.dtype == "float32":
            return self.apply_fn(variables, images, **kwargs)
        variables = jax.tree.map(lambda x: x.astype(self.dtype), variables)
        logits = self.apply_fn(variables, images.astype(self.dtype), **kwargs)
        return logits.astype(jnp.float32)


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 pixels in [0, 255] -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def _logits_of(apply_fn: Callable, params: Any, images: jax.Array, dropout_key) -> jax.Array:
    """Logits; a ``dropout_key`` turns the model's dropout layers on (training)."""
    rngs = {} if dropout_key is None else {"dropout": dropout_key}
    return apply_fn({"params": params}, normalize_images(images), rngs=rngs)


def loss_and_metrics(
    params: Any, apply_fn: Callable, batch: Batch, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """Mean softmax cross-entropy over the unmasked examples, and metric sums.

    ``batch["mask"]`` (float, 1 = real example, 0 = padding) weights every
    example, so padded slots affect neither the loss nor the metrics.
    """
    logits = _logits_of(apply_fn, params, batch["image"], dropout_key)
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    count = jnp.sum(mask)
    loss_sum = jnp.sum(losses * mask)
    correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
    metrics = {"loss_sum": loss_sum, "correct": jnp.sum(correct * mask), "count": count}
    return loss_sum / jnp.maximum(count, 1.0), metrics


def example_loss(params: Any, apply_fn: Callable, example: Batch) -> jax.Array:
    """Cross-entropy of ONE example (``image`` HWC uint8, scalar ``label``).

    An optional ``example["dropout_key"]`` turns dropout on, as in training.
    """
    key = example.get("dropout_key")
    logits = _logits_of(apply_fn, params, example["image"][None], key)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimizer step: ``(state, batch) -> (state, metric sums)``, pure.

    ``batch`` holds ``image`` (uint8 NHWC), ``label`` (int) and ``mask``
    (float). Metric sums: ``loss_sum``, ``correct`` and ``count``. With
    ``state.clip_per_example`` the gradient is DP-SGD's clipped, noised mean
    of per-example gradients, with noise from ``fold_in(state.key, state.step)``.
    Dropout layers draw from ``fold_in(fold_in(state.key, state.step), 1)``
    (each example its own key under DP-SGD) and random shifts from ``..., 2)``,
    so a run is the same for a seed, and a resumed run draws what an
    uninterrupted one would.
    ``build_train`` compiles it; it also works under ``jax.jit`` and ``jax.vmap``.
    """
    step_key = jax.random.fold_in(state.key, state.step)
    dropout_key = jax.random.fold_in(step_key, 1)
    if state.max_shift:
        shift_key = jax.random.fold_in(step_key, 2)
        batch = {
            **batch,
            "image": transforms.random_shift(shift_key, batch["image"], state.max_shift),
        }
    if state.clip_per_example:
        _, metrics = loss_and_metrics(state.params, state.apply_fn, batch, dropout_key)
        examples = {
            "image": batch["image"],
            "label": batch["label"],
            "dropout_key": jax.random.split(dropout_key, batch["label"].shape[0]),
        }
        grads, _ = per_example.private_mean(
            per_example.per_example_grads(
                lambda params, example: example_loss(params, state.apply_fn, example),
                state.params,
                examples,
            ),
            batch["mask"],
            state.hparams["clip_norm"],
            state.hparams["noise_multiplier"],
            step_key,
        )
    else:
        grad_fn = jax.grad(loss_and_metrics, has_aux=True)
        grads, metrics = grad_fn(state.params, state.apply_fn, batch, dropout_key)
    return state.apply_gradients(grads=grads), metrics


# How a step treats the state and the batch: one model; a population
# (stacked states) sharing each batch; a population with a batch per member
# (images and labels ``(K, B, ...)``, the mask shared).
STEP_FNS = {
    "single": train_step,
    "shared": jax.vmap(train_step, in_axes=(0, None)),
    "independent": jax.vmap(train_step, in_axes=(0, {"image": 0, "label": 0, "mask": None})),
}
