"""``check``: a config held to the field table, before any data is read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from cnnflat_jax.config import fit
from cnnflat_jax.config.fields import FIELDS, MODEL_FIELDS, default_fields, flat_fields, is_group
from cnnflat_jax.config.rules import ConfigError, Rule, show
from cnnflat_jax.nn import layers


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` for the first unknown, missing or invalid field.

    Checks each field against its rule, then the rules that tie fields
    together (list lengths, divisibility by the devices and data shards).
    """
    fields = {k: v for k, v in flat_fields(config).items() if not k.startswith("model.")}
    known = {k: v for k, v in default_fields().items() if not k.startswith("model.")}
    for key in fields.keys() - known.keys():
        raise ConfigError(key, fields[key], "unknown field", ", ".join(sorted(known)))
    for key in known.keys() - fields.keys():
        raise ConfigError(key, "", "missing field", "a value like the default " + show(known[key]))
    if not is_group(config.get("model")):
        raise ConfigError("model", config.get("model"), "not a group of fields", "a ConfigDict")
    for key, field in FIELDS.items():
        _check_rule(key, fields[key], field.rule)
    _check_model(config.model)
    _check_population(config)
    fit.check_devices(config)


def check_field(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises ``ConfigError`` if the field ``key`` (flat) breaks its rule: for a
    field used before the whole config can be checked (``check`` needs JAX's
    devices, and a multi-process run has them only once it has started)."""
    _check_rule(key, flat_fields(config).get(key), FIELDS[key].rule)


def _check_rule(key: str, value: Any, rule: Rule) -> None:
    fault = rule.why(value)
    if fault:
        raise ConfigError(key, value, fault, rule.allowed)


def _check_model(model: Mapping[str, Any]) -> None:
    from cnnflat_jax.nn import models

    _check_rule("model.name", model.get("name"), MODEL_FIELDS["name"].rule)
    cls = models.MODELS[model["name"]]
    takes = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes"}
    for key, value in model.items():
        if key != "name" and key not in takes:
            raise ConfigError(
                f"model.{key}", value, f"not a field of model {model['name']!r}",
                ", ".join(sorted(takes)),
            )  # fmt: skip
        if key == "layers":
            _check_layers(value)
        else:
            _check_rule(f"model.{key}", value, MODEL_FIELDS[key].rule)


def _check_layers(specs: Any) -> None:
    """A tuple of layer specs, each one parsing and fitting the one before it."""
    rule = MODEL_FIELDS["layers"].rule
    try:
        layers.parse(specs)
    except layers.SpecError as e:
        if isinstance(specs, (tuple, list)) and specs:
            raise ConfigError(f"model.layers[{e.position}]", e.spec, e.why, rule.allowed) from None
    _check_rule("model.layers", specs, rule)


def _check_population(config: ml_collections.ConfigDict) -> None:
    from cnnflat_jax.train import population

    size = config.population.size
    for list_name in population.MEMBER_LISTS:
        values = config.population[list_name]
        if len(values) not in (0, size):
            raise ConfigError(
                f"population.{list_name}", values,
                f"{len(values)} values for population.size={size}",
                f"{size} value(s), one per member, or none",
            )  # fmt: skip
    if config.population.seeds and len(set(config.population.seeds)) < size:
        raise ConfigError(
            "population.seeds", config.population.seeds, "a seed repeats", "distinct seeds"
        )
