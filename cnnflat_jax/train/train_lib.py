"""Training state, loss, the pure train step, the one training compiler, and eval.

``build_train`` is the only place a training step is compiled: ``train.py``,
the tests and the benchmarks all run its programs. Both of its loops take a
dispatch of host batches (``batching``): the per-step loop calls one
compiled step per batch; the compiled loop runs the whole dispatch in one
XLA program with ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.sharding import Mesh

from cnnflat_jax.data import transforms
from cnnflat_jax.train import per_example, sharding

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
LOOPS = ("compiled", "per_step")


class Divergence(NamedTuple):
    """Whether a call's steps diverged: the first step (of the call) whose mean
    training loss was NaN, Inf or above ``max_loss``, and that loss (the worst
    member's, for a population); ``step`` is -1 when none did."""

    step: int
    loss: float

    @property
    def diverged(self) -> bool:
        return self.step >= 0


def _divergence(loss_sum, count, max_loss: float):
    """``(first diverged step or -1, its worst member's mean loss)`` over
    ``(steps, [K])`` sums: a step diverges when a mean loss is NaN, Inf or
    above ``max_loss`` (0: no bound). Works on jax and numpy arrays alike."""
    xp = jnp if isinstance(loss_sum, jax.Array) else np
    steps = loss_sum.shape[0]
    mean = (loss_sum / xp.maximum(count, 1.0)).reshape(steps, -1)
    worst = xp.where(xp.all(xp.isfinite(mean), axis=1), xp.max(mean, axis=1), xp.nan)
    bad = ~xp.isfinite(worst) | ((worst > max_loss) if max_loss > 0 else False)
    first = xp.where(xp.any(bad), xp.argmax(bad), -1)
    return first, worst[xp.maximum(first, 0)]


def _scan_steps(state: TrainState, batches: Batch, mode: str, max_loss: float):
    """``batches["mask"].shape[0]`` steps in one program; all-masked steps are skipped."""
    step_fn = STEP_FNS[mode]

    def skip(state, batch):
        metrics = jax.eval_shape(step_fn, state, batch)[1]
        return state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)

    def body(state, batch):
        return jax.lax.cond(jnp.any(batch["mask"] > 0), step_fn, skip, state, batch)

    state, metrics = jax.lax.scan(body, state, batches)
    sums = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)
    return state, sums, _divergence(metrics["loss_sum"], metrics["count"], max_loss)


def build_train(
    state: TrainState,
    mesh: Mesh,
    *,
    loop: str,
    mode: str,
    steps: int,
    batch_size: int,
    image_shape: tuple[int, ...],
    image_dtype: Any = np.uint8,
    max_loss: float = 0.0,
) -> TrainProgram:
    """Compiles training for ``steps`` steps a call: the one way any code trains.

    The state is replicated over ``mesh`` and donated; each batch is split
    along its batch axis over the mesh, so XLA averages the gradient across
    devices. ``loop="compiled"`` runs the steps in one XLA program
    (``lax.scan``); ``loop="per_step"`` calls one compiled step per batch
    from Python, skipping all-masked steps.

    Args:
      state: a ``TrainState`` (stacked for a population) sharded like the
        states it will be called with.
      mesh: the device mesh (``sharding.data_mesh``).
      loop: one of ``LOOPS``.
      mode: a key of ``STEP_FNS``.
      steps: steps per call.
      batch_size: the global batch size (all processes together).
      image_shape, image_dtype: one example's image.
      max_loss: a step whose mean loss exceeds it counts as diverged (0: only
        NaN and Inf do).

    Returns:
      A ``TrainProgram``: ``program(state, batches) -> (state, metric sums,
      divergence)``,
      where ``batches`` are this process's columns of one call's batches
      (``batching.TrainData.batches``): ``image`` ``(steps, [K,] b, H, W, C)``,
      ``label`` ``(steps, [K,] b)``, ``mask`` ``(steps, b)``, with
      ``b = batch_size / process count`` and ``K`` members for
      ``mode="independent"``. The sums are host numpy
      arrays (``(K,)`` each for a population); the ``Divergence`` names the
      first step of the call whose mean loss is NaN, Inf or above
      ``max_loss`` (-1: none) and that loss.
    """
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; choose one of {LOOPS}")
    members = jax.tree.leaves(state.step)[0].shape[:1] if mode == "independent" else ()
    lead_shape = (steps, *members, batch_size)
    if loop == "per_step":
        lead_shape = lead_shape[1:]
    batch_axis = len(lead_shape) - 1
    shardings = {
        "image": sharding.batch_sharding(mesh, batch_axis),
        "label": sharding.batch_sharding(mesh, batch_axis),
        "mask": sharding.batch_sharding(mesh, batch_axis - len(members)),
    }
    mask_shape = lead_shape[: -1 - len(members)] + lead_shape[-1:]
    abstract = {
        "image": jax.ShapeDtypeStruct(
            lead_shape + tuple(image_shape), image_dtype, sharding=shardings["image"]
        ),
        "label": jax.ShapeDtypeStruct(lead_shape, np.int32, sharding=shardings["label"]),
        "mask": jax.ShapeDtypeStruct(mask_shape, np.float32, sharding=shardings["mask"]),
    }
    fn, outputs = STEP_FNS[mode], 2  # (state, metrics)
    if loop == "compiled":  # (state, sums, divergence)
        fn, outputs = functools.partial(_scan_steps, mode=mode, max_loss=max_loss), 3
    replicated = sharding.replicated(mesh)
    compiled = jax.jit(
        fn,
        in_shardings=(replicated, shardings),
        out_shardings=(replicated,) * outputs,
        donate_argnums=0,
    )
    return TrainProgram(compiled.lower(state, abstract).compile(), shardings, loop, max_loss)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What ``build_train`` compiled: call it as ``program(state, batches)``.

    ``compiled`` is the XLA executable (one step, or a dispatch's scan), for
    its memory analysis and HLO text.
    """

    compiled: jax.stages.Compiled
    shardings: dict[str, jax.sharding.NamedSharding]
    loop: str
    max_loss: float

    def __call__(
        self, state: TrainState, batches: dict[str, np.ndarray]
    ) -> tuple[TrainState, dict[str, np.ndarray], Divergence]:
        if self.loop == "compiled":
            state, sums, (step, loss) = self.compiled(state, self._on_devices(batches))
            return state, jax.device_get(sums), Divergence(int(step), float(loss))
        totals, divergence = {}, Divergence(-1, np.nan)
        for t in np.flatnonzero(np.any(batches["mask"] > 0, axis=-1)):
            batch = self._on_devices({k: v[t] for k, v in batches.items()})
            state, metrics = self.compiled(state, batch)
            metrics = jax.device_get(metrics)
            first, loss = _divergence(
                metrics["loss_sum"][None], metrics["count"][None], self.max_loss
            )
            if not divergence.diverged and first == 0:
                divergence = Divergence(int(t), float(loss))
            totals = {k: totals.get(k, 0) + v for k, v in metrics.items()}
        return state, totals, divergence

    def _on_devices(self, host_batch: dict[str, np.ndarray]) -> Batch:
        """Each process's columns -> global arrays split over the mesh."""
        return {k: sharding.global_array(v, self.shardings[k]) for k, v in host_batch.items()}
