"""A finished run, loaded: ``config, data, model, params = load_run(workdir)``.

What ``export``, ``explain``, the interop ports and the flatten experiments
read of a run that ``train.py`` finished: its config, ``data.json``, the Flax
module its config describes and its final parameters.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import ml_collections

from cnnflat_jax.nn import models
from cnnflat_jax.run import checkpoints
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.run.workdir import RunError
from cnnflat_jax.train import population


def model_fields(config: Any) -> dict[str, Any]:
    """A loaded config's ``model`` group as ``models.from_fields`` takes it (JSON's
    lists as tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items()}


class TrainedRun(NamedTuple):
    """A finished ``train.py`` run, loaded: ``config, data, model, params = load_run(w)``.

    Attributes:
      config: the run's config (an ``ml_collections.ConfigDict``).
      data: ``data.json``: the dataset, image shape, class count and names.
      model: the Flax module of one model.
      params: one model's parameters, or every member's stacked on a leading
        axis when a population was loaded whole.
    """

    config: Any
    data: dict[str, Any]
    model: Any
    params: Any

    @property
    def team(self) -> population.Population:
        """The run's ``population.Population``: one model, or its members."""
        return population.of_config(self.config)


def load_run(
    workdir: str | os.PathLike, member: int | None = None, *, whole_population: bool = False
) -> TrainedRun:
    """A finished run: its config, data info, model and final parameters.

    Args:
      workdir: a ``train.py`` workdir that finished (it has ``final_params/``).
      member: for a population, which member's parameters to load.
      whole_population: for a population with no ``member``, load every
        member's parameters, stacked.

    Raises:
      RunError: not a finished run; a population without a member (unless
        ``whole_population``); a member out of range, or one given for a
        single model.
    """
    config = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
    data = workdir_lib.read_data_info(workdir)
    team = population.of_config(config)
    if team.is_population and member is None and not whole_population:
        raise RunError(
            f"{os.fspath(workdir)!r} holds a population of {team.size} models; choose a member"
        )
    if member is not None and not (team.is_population and 0 <= member < team.size):
        size = f"a population of {team.size}" if team.is_population else "one model"
        raise RunError(
            f"member {member} is out of range: {os.fspath(workdir)!r} holds {size}"
            + (f" (members 0 to {team.size - 1})" if team.is_population else "")
        )
    model = models.from_fields(model_fields(config), data["num_classes"])
    x = jax.ShapeDtypeStruct((1, *data["image_shape"]), jax.numpy.float32)
    like = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    if team.is_population:
        like = jax.tree.map(lambda a: jax.ShapeDtypeStruct((team.size, *a.shape), a.dtype), like)
    final = workdir_lib.path(workdir, workdir_lib.FINAL_PARAMS)
    if not workdir_lib.is_directory(final):
        raise RunError(
            f"{os.fspath(workdir)!r} has no {workdir_lib.FINAL_PARAMS}/: the run has not finished"
        )
    params = checkpoints.load_params(final, like)
    if member is not None:
        params = jax.tree.map(lambda a: a[member], params)
    return TrainedRun(config, data, model, params)
