"""The programs that ``train.py`` runs, built as the trainer builds them, for timing.

Every benchmark that times our training goes through ``training`` here, so it
times the program a run builds (``cnnflat_jax.train.programs``) with the host
gather in front of each call, as a run does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from jax.sharding import Mesh

from cnnflat_jax.data import batching, input_pipeline
from cnnflat_jax.train import evaluation, population, programs, sharding, train_lib

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
    steps_per_epoch = batching.steps_per_epoch(train.shard_sizes, config.batch_size)
    begun = programs.start(config, data.image_shape, data.num_classes, steps_per_epoch, mesh)
    start = time.perf_counter()
    program = programs.train_program(
        config, begun.state, begun.team, mesh, data.image_shape, steps_per_epoch,
        loop=loop, steps=steps,
    )  # fmt: skip
    compile_sec = time.perf_counter() - start
    indices, mask = batching.members_plan(
        begun.data_keys, 1, train.shard_sizes, config.batch_size, steps
    )
    return Training(
        begun.state,
        program,
        len(indices),
        lambda d: train.batches(indices[d], mask[d]),
        compile_sec,
    )


def eval_program(
    config: ml_collections.ConfigDict, data: input_pipeline.Dataset, state: train_lib.TrainState
) -> tuple[Callable[[train_lib.TrainState], dict], float]:
    """``(evaluate(state) -> totals, compile seconds)`` for the test split, as a run compiles it."""
    mesh = sharding.data_mesh(config.num_devices)
    splits = evaluation.eval_splits(data, None, config.eval_batch_size, 1, mesh)
    start = time.perf_counter()
    team = population.of_config(config)
    compiled = programs.eval_programs(state, team, {"test": splits["test"]})["test"]
    arrays = splits["test"]
    return lambda state: compiled(state, *arrays), time.perf_counter() - start
