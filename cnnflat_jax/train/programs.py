"""A run's programs, built one way: config, data shapes and mesh -> the model,
its initial state, and the compiled training and eval programs.

The trainer builds a run through here; the benchmarks time what it builds;
the TPU pre-flight check compiles it for a slice it does not have (it places
the state itself, as abstract arrays on the slice's mesh).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from cnnflat_jax.nn import models
from cnnflat_jax.train import evaluation, population, sharding, train_lib


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: one model or a population of them (``team``), the
    initial state and the data-order keys (``population.initial_state``)."""

    team: population.Population
    state: train_lib.TrainState
    data_keys: list[jax.Array]


def start(
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, ...],
    num_classes: int,
    steps_per_epoch: int,
    mesh: Mesh | None,
) -> Start:
    """``config``'s model and initial state, replicated over ``mesh`` (None: left
    where it was made, for a caller that places it itself)."""
    model = models.from_fields(config.model, num_classes)
    team = population.of_config(config)  # One model or K members: decided here, once.
    state, keys = population.initial_state(config, team, model, image_shape, steps_per_epoch)
    if mesh is not None:
        state = sharding.replicate(state, mesh)
    return Start(team, state, keys)


def steps_per_dispatch(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The steps one call of the training program runs: the config's, at most an epoch."""
    return min(config.steps_per_dispatch, steps_per_epoch)


def train_program(
    config: ml_collections.ConfigDict,
    state: train_lib.TrainState,
    team: population.Population,
    mesh: Mesh,
    image_shape: tuple[int, ...],
    steps_per_epoch: int,
    *,
    loop: str | None = None,
    steps: int | None = None,
) -> train_lib.TrainProgram:
    """``config``'s training program for states like ``state`` over ``mesh``:
    ``loop`` (the config's by default), ``steps`` a call (``steps_per_dispatch``
    by default)."""
    return train_lib.build_train(
        state, mesh, loop=loop or config.loop, mode=team.mode,
        steps=steps or steps_per_dispatch(config, steps_per_epoch),
        batch_size=config.batch_size, image_shape=image_shape, max_loss=config.max_loss,
    )  # fmt: skip


def eval_programs(
    state: train_lib.TrainState, team: population.Population, splits: dict[str, tuple[Any, ...]]
) -> dict[str, Any]:
    """The compiled eval program of each split (``evaluation.eval_splits``'
    arrays, or abstract ones of their shapes) for states like ``state``;
    splits of one shape share one."""
    compiled, by_shapes = {}, {}
    for name, arrays in splits.items():
        shapes = tuple(array.shape for array in arrays)
        if shapes not in by_shapes:
            lowered = evaluation.eval_batches.lower(state, *arrays, population=team.is_population)
            by_shapes[shapes] = lowered.compile()
        compiled[name] = by_shapes[shapes]
    return compiled
