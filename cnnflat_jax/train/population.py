"""A population of K models trained as one program: ``vmap`` over stacked states.

Members differ by seed and by hyperparameters (learning rate, weight decay,
momentum), which live in each member's ``TrainState.hparams``. They share
every data batch, or, with ``independent_data_order``, each member draws its
own order from its seed, exactly as a single run with that seed would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cnnflat_jax.train import optimizer, step

# config.population list -> the member field it sets.
MEMBER_LISTS = {
    "seeds": "seed",
    "learning_rates": "learning_rate",
    "weight_decays": "weight_decay",
    "momenta": "momentum",
}


@dataclasses.dataclass(frozen=True)
class Population:
    """Who a run trains: one model, or K members in one program.

    Made once, from the config, when a run starts (or a finished run is
    loaded), and passed down: nothing else asks a config, a record or a state
    whether a run is a population.

    Attributes:
      members: one dict per member: ``seed`` and every hyperparameter of
        ``step.HPARAMS`` (one dict for one model).
      mode: the step's ``step.STEP_FNS`` key: "single", or for a
        population "shared" (one data order) or "independent" (each member's
        order from its seed, as a single run with that seed would have).
    """

    members: tuple[dict[str, Any], ...]
    mode: str

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def is_population(self) -> bool:
        return self.mode != "single"


def of_config(config: ml_collections.ConfigDict) -> Population:
    """The config's model or population. Unlisted member values come from the
    config; seeds default to ``seed + k``."""
    population = config.population
    members = []
    for k in range(population.size):
        member = {"seed": config.seed + k, **optimizer.config_hparams(config)}
        for list_name, field in MEMBER_LISTS.items():
            if population[list_name]:
                member[field] = population[list_name][k]
        members.append(member)
    if population.size == 1:
        mode = "single"
    else:
        mode = "independent" if population.independent_data_order else "shared"
    return Population(tuple(members), mode)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(state key, data-order key)`` of a run with ``seed``; members use it too."""
    state_key, data_key = jax.random.split(jax.random.key(seed))
    return state_key, data_key


def create_population(
    model: nn.Module,
    image_shape: tuple[int, ...],
    make_tx,
    member_list: Sequence[dict[str, Any]],
    clip_per_example: bool = False,
    max_shift: int = 0,
    compute_dtype: str = "float32",
) -> step.TrainState:
    """A stacked TrainState: every leaf gains a leading member axis ``K``.

    Member ``k`` is initialised exactly as a single run with its seed and
    hyperparameters.
    """
    keys = jnp.stack([run_keys(m["seed"])[0] for m in member_list])
    hparams = {
        name: jnp.asarray([m[name] for m in member_list], jnp.float32) for name in step.HPARAMS
    }

    def create(key, hparams):
        return step.create_train_state(
            model, image_shape, make_tx, hparams, key, clip_per_example, max_shift, compute_dtype
        )

    return jax.vmap(create)(keys, hparams)


def member_state(state: step.TrainState, k: int) -> step.TrainState:
    """Member ``k`` of a stacked state, as a single-model state."""
    return jax.tree.map(lambda leaf: leaf[k], state)


def initial_state(
    config: ml_collections.ConfigDict,
    team: Population,
    model: nn.Module,
    image_shape: tuple[int, ...],
    steps_per_epoch: int,
) -> tuple[step.TrainState, list[jax.Array]]:
    """A run's initial state (stacked for a population) and its data-order keys:
    one, or one per member for the "independent" mode."""
    make_tx = optimizer.optimizer_factory(config, steps_per_epoch)
    options = {
        "clip_per_example": config.per_example.clip_norm > 0,
        "max_shift": config.augment_shift,
        "compute_dtype": config.compute_dtype,
    }
    if team.is_population:
        state = create_population(model, image_shape, make_tx, team.members, **options)
    else:
        key = run_keys(config.seed)[0]
        state = step.create_train_state(
            model, image_shape, make_tx, team.members[0], key, **options
        )
    seeds = [m["seed"] for m in team.members] if team.mode == "independent" else [config.seed]
    return state, [run_keys(seed)[1] for seed in seeds]
