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

from cnnflat_jax import reporting, train_lib

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


def epoch_record(
    epoch: int,
    state: train_lib.TrainState,
    member_list: list[dict[str, Any]],
    totals: dict[str, np.ndarray],
    scores: dict[str, dict],
    timing: dict[str, float],
) -> dict[str, Any]:
    """The ensemble's record for an epoch, with the members' under ``members``.

    With a validation split it names the best member by validation accuracy.
    """
    step = int(np.max(state.step))
    member_records = [
        {
            "epoch": epoch,
            "step": step,
            "member": k,
            **member_list[k],
            **reporting.scores_record(totals, scores, k),
        }
        for k in range(len(member_list))
    ]
    ensemble = scores["test"]["ensemble"]
    record = {
        "epoch": epoch,
        "step": step,
        "member": "ensemble",
        "test_loss": ensemble["loss"],
        "test_accuracy": ensemble["accuracy"],
        "test_count": ensemble["count"],
        "mean_member_test_accuracy": float(np.mean([r["test_accuracy"] for r in member_records])),
        **timing,
        "members": member_records,
    }
    if "validation" in scores:
        best = int(np.argmax([r["validation_accuracy"] for r in member_records]))
        record["best_member"] = best
        record["best_member_validation_accuracy"] = member_records[best]["validation_accuracy"]
        record["best_member_test_accuracy"] = member_records[best]["test_accuracy"]
    return record


def summary(member_list: list[dict[str, Any]], record: dict[str, Any]) -> str:
    """The end-of-run table: each member's settings and accuracies, then the
    ensemble and the best member by validation."""
    columns = ["train_accuracy", "test_accuracy"]
    if "best_member" in record:
        columns.insert(1, "validation_accuracy")
    scores = [{c: r[c] for c in columns} for r in record["members"]]
    lines = [summary_table(member_list, scores)]
    lines.append(
        f"ensemble (averaged logits): test accuracy {record['test_accuracy']:.4f}; "
        f"mean member {record['mean_member_test_accuracy']:.4f}"
    )
    if "best_member" in record:
        lines.append(
            f"best member by validation: {record['best_member']} (validation "
            f"{record['best_member_validation_accuracy']:.4f}, test "
            f"{record['best_member_test_accuracy']:.4f})"
        )
    return "\n".join(lines)
