"""A population of K models trained as one program: ``vmap`` over stacked states.

Members differ by seed and by hyperparameters (learning rate, weight decay,
momentum), which live in each member's ``TrainState.hparams``. They share
every data batch, or, with ``independent_data_order``, each member draws its
own order from its seed, exactly as a single run with that seed would.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnflat_jax import train_lib

# config.population list -> the member field it sets.
MEMBER_LISTS = {
    "seeds": "seed",
    "learning_rates": "learning_rate",
    "weight_decays": "weight_decay",
    "momenta": "momentum",
}


def check_config(population: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` for a bad size or a list of the wrong length."""
    if not isinstance(population.size, int) or population.size < 1:
        raise ValueError(f"population.size must be an int >= 1, got {population.size!r}")
    for name in MEMBER_LISTS:
        values = population[name]
        if len(values) not in (0, population.size):
            raise ValueError(
                f"population.{name} has {len(values)} values for population.size="
                f"{population.size}; give one per member or none"
            )


def members(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """One dict per member: ``seed`` and every hyperparameter of ``HPARAMS``.

    Unlisted values come from the config; seeds default to ``seed + k``.
    """
    population = config.population
    result = []
    for k in range(population.size):
        member = {"seed": config.seed + k, **train_lib.config_hparams(config)}
        for list_name, field in MEMBER_LISTS.items():
            if population[list_name]:
                member[field] = population[list_name][k]
        result.append(member)
    return result


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(state key, data-order key)`` of a run with ``seed``; members use it too."""
    state_key, data_key = jax.random.split(jax.random.key(seed))
    return state_key, data_key


def create_population(
    model: nn.Module,
    image_shape: tuple[int, ...],
    make_tx,
    member_list: list[dict[str, Any]],
    clip_per_example: bool = False,
) -> train_lib.TrainState:
    """A stacked TrainState: every leaf gains a leading member axis ``K``.

    Member ``k`` is initialised exactly as a single run with its seed and
    hyperparameters.
    """
    keys = jnp.stack([run_keys(m["seed"])[0] for m in member_list])
    hparams = {
        name: jnp.asarray([m[name] for m in member_list], jnp.float32) for name in train_lib.HPARAMS
    }

    def create(key, hparams):
        return train_lib.create_train_state(
            model, image_shape, make_tx, hparams, key, clip_per_example
        )

    return jax.vmap(create)(keys, hparams)


def member_state(state: train_lib.TrainState, k: int) -> train_lib.TrainState:
    """Member ``k`` of a stacked state, as a single-model state."""
    return jax.tree.map(lambda leaf: leaf[k], state)


def summary_table(member_list: list[dict[str, Any]], scores: list[dict[str, float]]) -> str:
    """A plain-text table: one row per member with its settings and scores."""
    settings = ["seed", "learning_rate", "weight_decay", "momentum"]
    score_names = list(scores[0])
    header = ["member", *settings, *score_names]
    rows = [
        [str(k), *(f"{m[s]:g}" for s in settings), *(f"{row[n]:.4f}" for n in score_names)]
        for k, (m, row) in enumerate(zip(member_list, scores))
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join(lines)


def stack_plans(plans: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-member epoch plans -> ``(dispatches, steps, K, batch)`` indices, one mask.

    Every member's plan pads the same example count, so the masks are equal.
    """
    indices = np.stack([p[0] for p in plans], axis=2)
    return indices, plans[0][1]
