"""Training state, loss, the jitted train/eval steps and the compiled epoch loop.

An epoch's data order is one permutation per epoch (``fold_in(key, epoch)``),
padded to whole batches with masked-out slots, so the last partial batch is
trained on and not dropped. Both loops consume the same plan, gathered on the
host one dispatch at a time: the per-step loop calls ``train_step`` per
batch; the compiled loop runs ``steps_per_dispatch`` steps per XLA program
with ``lax.scan``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from cnnflat_jax import per_example

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")
HPARAMS = ("learning_rate", "weight_decay", "momentum", "clip_norm", "noise_multiplier")


class TrainState(struct.PyTreeNode):
    """Step, parameters, optimizer state, hyperparameters and a PRNG key.

    ``hparams`` (see ``HPARAMS``) are arrays rather than Python constants, so
    a vmapped population can give each member its own; the optimizer is
    rebuilt from them by ``make_tx`` inside the step. ``key`` seeds per-step
    randomness as ``fold_in(key, step)``. ``clip_per_example`` turns on the
    DP-SGD update (per-example clipping by ``clip_norm`` plus Gaussian noise
    of std ``noise_multiplier * clip_norm``).
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    hparams: dict[str, jax.Array]
    key: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    make_tx: Callable[..., optax.GradientTransformation] = struct.field(pytree_node=False)
    clip_per_example: bool = struct.field(pytree_node=False, default=False)

    def apply_gradients(self, grads: Any) -> TrainState:
        tx = self.make_tx(**self.hparams)
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def optimizer_factory(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> Callable[..., optax.GradientTransformation]:
    """``make_tx(**hparams)``: SGD+momentum, Adam or AdamW on a schedule.

    The schedule's shape (constant, or linear warmup then cosine decay to 0)
    is fixed by the config; its peak is ``hparams["learning_rate"]``.
    """
    if config.schedule == "constant":
        shape = optax.constant_schedule(1.0)
    elif config.schedule == "warmup_cosine":
        shape = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=1.0,
            warmup_steps=int(config.warmup_epochs * steps_per_epoch),
            decay_steps=config.num_epochs * steps_per_epoch,
        )
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; choose one of {SCHEDULES}")
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


def config_hparams(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The config's hyperparameters, as ``TrainState.hparams`` holds them."""
    return {
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "momentum": config.momentum,
        "clip_norm": config.per_example.clip_norm,
        "noise_multiplier": config.per_example.noise_multiplier,
    }


def create_train_state(
    model: nn.Module,
    image_shape: tuple[int, ...],
    make_tx: Callable[..., optax.GradientTransformation],
    hparams: dict[str, Any],
    key: jax.Array,
    clip_per_example: bool = False,
) -> TrainState:
    """Initialises parameters for ``(1, *image_shape)`` inputs and the optimizer.

    ``key`` is split into the initialisation key and the state's own key.
    Works under ``jax.vmap`` over ``hparams`` and ``key`` (a population).
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
            apply_fn=model.apply,
            make_tx=make_tx,
            clip_per_example=clip_per_example,
        )

    return init(key, hparams)


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
    loss_sum = jnp.sum(losses * mask)
    correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
    metrics = {"loss_sum": loss_sum, "correct": jnp.sum(correct * mask), "count": count}
    return loss_sum / jnp.maximum(count, 1.0), metrics


def example_loss(params: Any, apply_fn: Callable, example: Batch) -> jax.Array:
    """Cross-entropy of ONE example (``image`` HWC uint8, scalar ``label``)."""
    logits = apply_fn({"params": params}, normalize_images(example["image"][None]))[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])


def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    if state.clip_per_example:
        _, metrics = loss_and_metrics(state.params, state.apply_fn, batch)
        examples = {"image": batch["image"], "label": batch["label"]}
        grads, _ = per_example.private_mean(
            per_example.per_example_grads(
                lambda params, example: example_loss(params, state.apply_fn, example),
                state.params,
                examples,
            ),
            batch["mask"],
            state.hparams["clip_norm"],
            state.hparams["noise_multiplier"],
            jax.random.fold_in(state.key, state.step),
        )
    else:
        grad_fn = jax.grad(loss_and_metrics, has_aux=True)
        grads, metrics = grad_fn(state.params, state.apply_fn, batch)
    return state.apply_gradients(grads=grads), metrics


train_step = jax.jit(_train_step, donate_argnums=0)
train_step.__doc__ = """One optimizer step: ``(state, batch) -> (state, metric sums)``.

``batch`` holds ``image`` (uint8 NHWC), ``label`` (int) and ``mask`` (float);
``state`` is donated. Metric sums: ``loss_sum``, ``correct`` and ``count``.
With ``state.clip_per_example`` the gradient is DP-SGD's clipped, noised mean
of per-example gradients.
"""

# How a scan step treats the state and the batch: one model; a population
# (stacked states) sharing each batch; a population with a batch per member
# (images and labels ``(K, B, ...)``, the mask shared).
STEP_FNS = {
    "single": _train_step,
    "shared": jax.vmap(_train_step, in_axes=(0, None)),
    "independent": jax.vmap(_train_step, in_axes=(0, {"image": 0, "label": 0, "mask": None})),
}


def epoch_plan(
    key: jax.Array,
    epoch: int,
    shard_sizes: int | Sequence[int],
    batch_size: int,
    steps_per_dispatch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's example order as ``(dispatches, steps_per_dispatch, batch)``.

    The examples are ``len(shard_sizes)`` contiguous shards (an int is one
    shard); shard ``s`` fills batch columns ``[s * b, (s + 1) * b)`` with
    ``b = batch_size / len(shard_sizes)``, in a permutation drawn from
    ``fold_in(key, epoch)`` (one shard) or ``fold_in(fold_in(key, epoch), s)``.
    See ``sharding`` for why.

    Returns:
      ``(indices, mask)``: indices into the concatenated shards, padded with
      each shard's first index and mask 0 up to whole batches and whole
      dispatches. Steps whose mask is all zero are skipped.
    """
    sizes = _shard_list(shard_sizes)
    per_shard = batch_size // len(sizes)
    steps = steps_per_epoch(sizes, batch_size)
    steps = -(-steps // steps_per_dispatch) * steps_per_dispatch
    epoch_key = jax.random.fold_in(key, epoch)
    indices = np.zeros((len(sizes), steps * per_shard), np.int32)
    mask = np.zeros((len(sizes), steps * per_shard), np.float32)
    for s, (start, size) in enumerate(zip(np.cumsum([0, *sizes]), sizes)):
        shard_key = epoch_key if len(sizes) == 1 else jax.random.fold_in(epoch_key, s)
        indices[s] = start
        indices[s, :size] += np.asarray(jax.random.permutation(shard_key, size))
        mask[s, :size] = 1.0
    shape = (steps // steps_per_dispatch, steps_per_dispatch, batch_size)

    def batches(x):  # (shard, step * per_shard) -> (dispatch, step, shard * per_shard)
        x = x.reshape(len(sizes), steps, per_shard).transpose(1, 0, 2)
        return x.reshape(shape)

    return batches(indices), batches(mask)


def _shard_list(shard_sizes: int | Sequence[int]) -> list[int]:
    """Shard sizes as a list; an int is one shard."""
    return [shard_sizes] if isinstance(shard_sizes, int) else list(shard_sizes)


def steps_per_epoch(shard_sizes: int | Sequence[int], batch_size: int) -> int:
    """Steps for every example of the largest shard (see ``epoch_plan``)."""
    sizes = _shard_list(shard_sizes)
    return -(-max(sizes) // (batch_size // len(sizes)))


def gather_batches(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, mask: np.ndarray
) -> Batch:
    """One dispatch's batches, gathered on the host: ``(steps, [K,] batch, ...)``."""
    return {"image": images[indices], "label": labels[indices], "mask": mask}


def _train_steps(state: TrainState, batches: Batch, mode: str = "single"):
    step_fn = STEP_FNS[mode]

    def skip(state, batch):
        metrics = jax.eval_shape(step_fn, state, batch)[1]
        return state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)

    def body(state, batch):
        return jax.lax.cond(jnp.any(batch["mask"] > 0), step_fn, skip, state, batch)

    state, metrics = jax.lax.scan(body, state, batches)
    num_steps = batches["mask"].shape[0]
    finite = jnp.all(jnp.isfinite(metrics["loss_sum"].reshape(num_steps, -1)), axis=1)
    sums = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)
    sums["first_nonfinite_step"] = jnp.where(jnp.all(finite), -1, jnp.argmin(finite))
    return state, sums


train_steps = jax.jit(_train_steps, donate_argnums=0, static_argnames="mode")
train_steps.__doc__ = """Runs ``batches["mask"].shape[0]`` train steps in one XLA program.

Args:
  state: the train state (donated); stacked for a population.
  batches: ``gather_batches`` of a dispatch: ``image`` ``(steps, batch, ...)``,
    ``label`` ``(steps, batch)``, ``mask`` ``(steps, batch)``; all-masked
    steps leave the state untouched. With ``mode="independent"``, images and
    labels are ``(steps, K, batch, ...)``: one order per member.
  mode: a key of ``STEP_FNS``.

Returns:
  The new state and the metric sums over all steps (``(K,)`` each for a
  population), plus ``first_nonfinite_step``: the first step (within this
  call) whose loss is NaN or Inf, or -1.
"""


def sharded_step(mode: str, replicated: Any, batch_shardings: Any, *, scan: bool) -> Callable:
    """``train_steps`` (``scan``) or one step for ``mode``, jitted with explicit shardings.

    The state and the metrics are ``replicated``; the batch follows
    ``batch_shardings`` (split along its batch axis), so XLA averages the
    gradient across devices.
    """
    fn = functools.partial(_train_steps, mode=mode) if scan else STEP_FNS[mode]
    return jax.jit(
        fn,
        in_shardings=(replicated, batch_shardings),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


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


def eval_arrays(
    images: np.ndarray, labels: np.ndarray, batch_size: int, num_batches: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads a split to whole batches (at least ``num_batches``) for ``eval_batches``.

    Returns:
      ``(images, labels, mask)`` shaped ``(batches, batch_size, ...)``; the
      padding has mask 0.
    """
    n = len(images)
    pad = max(-(-n // batch_size), num_batches) * batch_size - n
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return (
        images.reshape(-1, batch_size, *images.shape[1:]),
        labels.reshape(-1, batch_size),
        mask.reshape(-1, batch_size),
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
      ``confusion`` (lists; true label by predicted label). For a population
      compiled with ``population=True``: ``{"members": [one such dict per
      member], "ensemble": the averaged-logits dict}``.
    """
    totals = jax.device_get(eval_fn(state, *arrays))
    if "ensemble_confusion" not in totals:
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
