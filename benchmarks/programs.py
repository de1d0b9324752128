"""The programs that ``train.py`` runs, built as the trainer builds them, for timing.

Every benchmark that times our training goes through ``training`` here, so it
times ``train_lib.build_train``'s program with the host gather in front of
each call, as a run does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from jax.sharding import Mesh

from cnnflat_jax.data import batching, input_pipeline
from cnnflat_jax.nn import models
from cnnflat_jax.train import evaluation, population, sharding, train_lib

# The per-layer profiles' names for what no conv or dense layer claims.
BETWEEN = "between layers (ReLU, pool, flatten, loss)"
OPTIMIZER = "optimizer, loss sums and loop"


@dataclasses.dataclass
class Training:
    """A compiled training program and the batches of epoch 1, one dispatch a call."""

    state: train_lib.TrainState
    program: train_lib.TrainProgram
    num_dispatches: int
    gather: Callable[[int], dict[str, np.ndarray]]
    compile_sec: float

    def run(self, dispatch: int) -> dict[str, np.ndarray]:
        """Gathers a dispatch on the host and trains on it; returns the metric sums."""
        batches = self.gather(dispatch % self.num_dispatches)
        self.state, sums, _ = self.program(self.state, batches)
        return sums


def training(
    config: ml_collections.ConfigDict,
    data: input_pipeline.Dataset,
    *,
    loop: str,
    steps: int,
    mesh: Mesh | None = None,
) -> Training:
    """``config``'s initial state and training program (``steps`` steps a call).

    ``mesh`` defaults to the one ``train.py`` builds (``config.num_devices``).
    """
    mesh = mesh or sharding.data_mesh(config.num_devices)
    train, _ = batching.split_validation(data, 0, 1)
    model = models.from_fields(config.model, data.num_classes)
    steps_per_epoch = batching.steps_per_epoch(train.shard_sizes, config.batch_size)
    team = population.of_config(config)
    state, keys = population.initial_state(config, team, model, data.image_shape, steps_per_epoch)
    state = sharding.replicate(state, mesh)
    start = time.perf_counter()
    program = train_lib.build_train(
        state, mesh, loop=loop, mode=team.mode, steps=steps, batch_size=config.batch_size,
        image_shape=data.image_shape,
    )  # fmt: skip
    compile_sec = time.perf_counter() - start
    indices, mask = batching.members_plan(keys, 1, train.shard_sizes, config.batch_size, steps)
    return Training(
        state, program, len(indices), lambda d: train.batches(indices[d], mask[d]), compile_sec
    )


def eval_program(
    config: ml_collections.ConfigDict, data: input_pipeline.Dataset, state: train_lib.TrainState
) -> tuple[Callable[[train_lib.TrainState], dict], float]:
    """``(evaluate(state) -> totals, compile seconds)`` for the test split, as a run compiles it."""
    mesh = sharding.data_mesh(config.num_devices)
    arrays = evaluation.eval_splits(data, None, config.eval_batch_size, 1, mesh)["test"]
    start = time.perf_counter()
    is_population = population.of_config(config).is_population
    compiled = evaluation.eval_batches.lower(state, *arrays, population=is_population).compile()
    return lambda state: compiled(state, *arrays), time.perf_counter() - start
