"""The one training compiler, ``build_train``; the optimizer (``optimizer``) and
the step (``step``) it compiles are re-exported here.

``build_train`` is the only place a training step is compiled: ``train.py``,
the tests and the benchmarks all run its programs. Both of its loops take a
dispatch of host batches (``batching``): the per-step loop calls one
compiled step per batch; the compiled loop runs the whole dispatch in one
XLA program with ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cnnflat_jax.train import sharding
from cnnflat_jax.train.optimizer import (
    OPTIMIZERS,
    SCHEDULES,
    config_hparams,
    learning_rates,
    optimizer_factory,
    schedule_shape,
    warmup_steps,
)
from cnnflat_jax.train.step import (
    COMPUTE_DTYPES,
    HPARAMS,
    STEP_FNS,
    Batch,
    ComputeIn,
    Metrics,
    TrainState,
    create_train_state,
    example_loss,
    loss_and_metrics,
    normalize_images,
    train_step,
)

# Re-exported: the names callers have always found here.
__all__ = [
    "COMPUTE_DTYPES", "HPARAMS", "LOOPS", "OPTIMIZERS", "SCHEDULES", "STEP_FNS", "Batch",
    "ComputeIn", "Divergence", "Metrics", "TrainProgram", "TrainState", "build_train",
    "config_hparams", "create_train_state", "example_loss", "learning_rates",
    "loss_and_metrics", "normalize_images", "optimizer_factory", "schedule_shape",
    "train_step", "warmup_steps",
]  # fmt: skip

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
