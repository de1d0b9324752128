"""The limits a config meets only given its devices and its data: batches that split
over the devices and data shards, and a model that fits the images and the memory."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from cnnflat_jax.config.rules import ConfigError
from cnnflat_jax.nn import layers


def check_devices(config: ml_collections.ConfigDict) -> None:
    """Limits that depend on this run's devices and processes."""
    import jax

    from cnnflat_jax.train import sharding

    devices, processes = jax.device_count(), jax.process_count()
    if config.num_devices > devices:
        raise ConfigError(
            "num_devices", config.num_devices, f"only {devices} device(s) exist",
            f"0 (all) to {devices}",
        )  # fmt: skip
    if processes > 1 and config.num_devices not in (0, devices):
        raise ConfigError(
            "num_devices", config.num_devices, "a multi-process run uses every device", "0"
        )
    data_shards = sharding.data_shards(config)
    if data_shards % processes:
        raise ConfigError(
            "data_shards", config.data_shards,
            f"not a multiple of the {processes} processes", f"a multiple of {processes}",
        )  # fmt: skip
    num_devices = sharding.device_count(config.num_devices)
    for key, shards in (("batch_size", data_shards), ("eval_batch_size", processes)):
        multiple = math.lcm(num_devices, shards)
        if config[key] % multiple:
            raise ConfigError(
                key, config[key],
                f"does not split over the {num_devices} device(s) and {shards} data shard(s)",
                f"a multiple of {multiple}",
            )  # fmt: skip
    if config.per_example.report_hardest and processes > 1:
        raise ConfigError(
            "per_example.report_hardest", config.per_example.report_hardest,
            "the hardest-examples report runs on one process only", "0 in a multi-process run",
        )  # fmt: skip


def check_data(
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, ...],
    train_total: int,
    num_classes: int | None = None,
) -> None:
    """Raises ``ConfigError`` for limits set by the data: the split and the model's sizes.

    With ``num_classes``, the model must also output one logit per class.
    """
    from cnnflat_jax.train import sharding

    data_shards = sharding.data_shards(config)
    held = config.validation_examples
    if held % data_shards:
        raise ConfigError(
            "validation_examples", held, f"does not split over the {data_shards} data shards",
            f"a multiple of {data_shards}",
        )  # fmt: skip
    if train_total // data_shards - held // data_shards < 1:
        raise ConfigError(
            "validation_examples", held,
            f"leaves no training examples (the training set has {train_total})",
            f"0 to {train_total - data_shards}",
        )  # fmt: skip
    smallest = min(image_shape[:2])
    if config.augment_shift >= smallest:
        raise ConfigError(
            "augment_shift", config.augment_shift,
            f"would move {_hwc(image_shape)} images wholly off their canvas",
            f"0 to {smallest - 1}",
        )  # fmt: skip
    variables = _check_model_shapes(config.model, image_shape, num_classes)
    _check_memory(config, variables, image_shape)


def _check_model_shapes(model: Mapping[str, Any], image_shape, num_classes: int | None) -> Any:
    """The model runs on ``image_shape`` and, given ``num_classes``, outputs that many
    logits. Returns its variables' shapes (``params``, sown ``intermediates``)."""
    import jax

    from cnnflat_jax.nn import models

    module = models.from_fields(model, num_classes or 1)
    x = jax.ShapeDtypeStruct((1, *image_shape), jax.numpy.float32)
    try:
        output, variables = jax.eval_shape(
            lambda x: module.init_with_output(jax.random.key(0), x, mutable=True), x
        )
    except layers.SpecError as e:
        if model["name"] == "cnn":  # Named by the field that sets the layer.
            raise _cnn_field_error(model, e, image_shape) from None
        raise ConfigError(
            f"model.layers[{e.position}]", e.spec, f"on {_hwc(image_shape)} images: {e.why}",
            "layers that fit the maps they get",
        ) from None  # fmt: skip
    if num_classes and model["name"] == "sequential" and output.shape != (1, num_classes):
        raise ConfigError(
            "model.layers", model["layers"],
            f"outputs {_hwc(output.shape[1:])} values per image, but the dataset has "
            f"{num_classes} classes",
            f"layers ending in dense:{num_classes} (or a map pooled to it)",
        )  # fmt: skip
    return variables


def _check_memory(config: ml_collections.ConfigDict, variables, image_shape) -> None:
    """The run's memory floor (``memory.needs``) fits the memory there is. When
    even one example per batch would not fit, the model is named; else the
    larger of the two batch sizes."""
    import jax

    from cnnflat_jax.train import memory

    def needs(batch_size, eval_batch_size, steps_per_dispatch):
        return memory.needs(
            variables, image_shape, batch_size=batch_size, eval_batch_size=eval_batch_size,
            steps_per_dispatch=steps_per_dispatch, members=config.population.size,
        )  # fmt: skip

    asked = needs(config.batch_size, config.eval_batch_size, config.steps_per_dispatch)
    total, there = sum(asked.values()), memory.available()
    if total <= there:
        return
    parts = ", ".join(f"{name} {size / 2**30:.1f}" for name, size in asked.items())
    why = (
        f"the run needs at least {total / 2**30:.1f} GiB ({parts}), more than the "
        f"{there / 2**30:.1f} GiB of memory here"
    )
    if sum(needs(1, 1, 1).values()) > there:
        count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
        raise ConfigError(
            "model", f"{config.model.name} of {count:,} parameters", why, "smaller layers"
        )
    largest = max(("batch_size", "eval_batch_size"), key=asked.get)
    raise ConfigError(largest, config[largest], why, f"a smaller {largest}")


def _hwc(shape) -> str:
    return "x".join(map(str, shape))


def _cnn_field_error(model: Mapping[str, Any], error: layers.SpecError, image_shape) -> ConfigError:
    """The CNN's layer that does not fit its map (the model's own ``SpecError``),
    named by the field that sets it: ``kernel_size`` for a conv, ``pool_window``
    for a pool."""
    import jax

    from cnnflat_jax.nn import models

    specs = models.layer_specs(models.from_fields(model, 1))
    height, width = image_shape[:2]
    if error.position:  # The map the failing layer gets: the layers before it, run.
        before = models.Sequential(layers=specs[: error.position])
        x = jax.ShapeDtypeStruct((1, *image_shape), jax.numpy.float32)
        output, _ = jax.eval_shape(lambda x: before.init_with_output(jax.random.key(0), x), x)
        height, width = output.shape[1:3]
    conv = sum(spec.startswith("conv") for spec in specs[: error.position + 1]) - 1
    if specs[error.position].startswith("conv"):
        padding = model["padding"]
        # VALID: the kernel must fit the map. SAME: each tap must touch it somewhere.
        limit = min(height, width) if padding == "VALID" else 2 * min(height, width) - 1
        return ConfigError(
            "model.kernel_size", model["kernel_size"],
            f"too large for the {height}x{width} map of conv layer {conv} ({padding} padding)",
            f"1 to {limit}",
        )  # fmt: skip
    return ConfigError(
        "model.pool_window", model["pool_window"],
        f"larger than the {height}x{width} map after conv layer {conv}",
        f"1 to {min(height, width)}",
    )  # fmt: skip
