"""The config schema: every field's default, rule and place in the run's identity.

``FIELDS`` has one row per field, ``MODEL_FIELDS`` one per field of
``config.model`` (which of those a model takes is its class's business).
``defaults()`` is the default config (``configs/default.py`` returns it). A bad
value raises ``ConfigError``, whose message is one line::

    config.FIELD=VALUE: why; allowed: what would be accepted

``check`` runs before any data is read; ``check_data`` right after the data
loads, for the limits that depend on it (image size, training-set size).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from cnnflat_jax import paths
from cnnflat_jax.data import folders
from cnnflat_jax.errors import Error
from cnnflat_jax.nn import layers

# Loading a config (``train.py --help`` too) imports no JAX: the modules that
# name the choices (models, optimizers, ...) and the checks that run the model
# import it, so they are imported when a config is checked, not here.


class ConfigError(Error, ValueError):
    """A config with an unknown field or a value outside its rule."""

    def __init__(self, field: str, value: Any, why: str, allowed: str):
        super().__init__(f"config.{field}={show(value)}: {why}; allowed: {allowed}")


def show(value: Any) -> str:
    """A value as it is written on the command line (``--config.FIELD=VALUE``)."""
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


class Rule:
    """What a field may hold: ``allowed`` in words, ``why(value)`` the fault or None.

    ``allowed`` may be given as a function, called when first read.
    """

    def __init__(self, allowed: str | Callable[[], str], why: Callable[[Any], str | None]):
        self._allowed, self.why = allowed, why

    @property
    def allowed(self) -> str:
        return self._allowed() if callable(self._allowed) else self._allowed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(low, high, low_open=False, high_open=False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    return ""


def integer(low: int | None = None, high: int | None = None) -> Rule:
    def why(value):
        if not _is_int(value):
            return "not an int"
        if low is not None and value < low:
            return f"less than {low}"
        if high is not None and value > high:
            return f"greater than {high}"
        return None

    return Rule("an int" + _bounds(low, high), why)


def number(low=None, high=None, *, low_open=False, high_open=False) -> Rule:
    """A finite float (or int) within the bounds; ``*_open`` excludes the bound."""

    def why(value):
        if not _is_number(value):
            return "not a number"
        if not math.isfinite(value):
            return "not finite"
        if low is not None and (value <= low if low_open else value < low):
            return f"{'not greater than' if low_open else 'less than'} {low}"
        if high is not None and (value >= high if high_open else value > high):
            return f"{'not less than' if high_open else 'greater than'} {high}"
        return None

    return Rule("a finite number" + _bounds(low, high, low_open, high_open), why)


def choice_of(module: str, names: str) -> Rule:
    """One of the names in ``module.names`` (a tuple, or a dict's keys), read
    from that module when the rule is first used."""

    def options() -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(module), names))

    return Rule(
        lambda: ", ".join(options()), lambda v: None if v in options() else "not a known choice"
    )


def boolean() -> Rule:
    return Rule("True or False", lambda v: None if isinstance(v, bool) else "not a bool")


def directory() -> Rule:
    """A directory path, or "" for the default: anything but an existing file."""

    def why(value):
        if not isinstance(value, str):
            return "not a string"
        if value and paths.is_file(value):
            return "a file, not a directory"
        return None

    return Rule('a directory path, or "" for the default', why)


def existing_directory() -> Rule:
    """A directory that exists, or "" for the default: where input data is read."""

    def why(value):
        if not isinstance(value, str):
            return "not a string"
        if value and not paths.is_directory(value):
            return "a file, not a directory" if paths.exists(value) else "no such directory"
        return None

    return Rule('an existing directory, or "" for the default', why)


def dataset_name() -> Rule:
    """A dataset's name, or ``folder:PATH`` naming an existing folder."""

    def why(value):
        if not isinstance(value, str) or not value:
            return "not a non-empty string"
        if folders.is_folder(value) and not paths.is_directory(folders.root(value)):
            return f"{folders.root(value) or 'the path'} is not a directory"
        return None

    return Rule("a TFDS catalog name, or folder:PATH (a folder of class folders)", why)


def image_size() -> Rule:
    def why(value):
        return sequence(integer(1)).why(value) or (len(value) != 2 and "not two items") or None

    return Rule("a pair (height, width) of ints >= 1", why)


def sequence(item: Rule, *, non_empty: bool = False) -> Rule:
    """A tuple (or list) whose every item follows ``item``."""

    def why(value):
        if not isinstance(value, (tuple, list)):
            return "not a tuple"
        if non_empty and not value:
            return "empty"
        for i, v in enumerate(value):
            fault = item.why(v)
            if fault:
                return f"item {i} ({show(v)}) is {fault}"
        return None

    many = "a non-empty tuple" if non_empty else "a tuple"
    return Rule(f"{many} of items each {item.allowed}", why)


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its default, its rule, and whether it is part of the
    run's identity (a rerun on the same workdir must keep it) or free (how
    the run is watched or stored, not what it computes)."""

    default: Any
    rule: Rule
    identity: bool = True


_SEED = integer(-(2**63), 2**63 - 1)
_TRAIN_LIB, _MODELS = "cnnflat_jax.train.train_lib", "cnnflat_jax.nn.models"

# Every field but config.model's: one row each. ``defaults()`` builds the
# default config from it (configs/default.py); ``check`` holds a config to it.
FIELDS: dict[str, Field] = {
    # Data: a TFDS catalog name ("auto" also finds local IDX copies), or
    # folder:PATH, a folder of class folders of pictures (docs/guide/pictures.md).
    "dataset": Field("fashion_mnist", dataset_name()),
    "data_source": Field("auto", choice_of("cnnflat_jax.data.input_pipeline", "SOURCES")),
    # Data locations are part of the identity: other files may hold other data.
    "data_dir": Field("", directory()),  # TFDS data directory; "" = TFDS's default.
    "idx_dir": Field("", existing_directory()),  # Directory of MNIST-format IDX files.
    # 0 = the dataset's own class count (TFDS's metadata; for IDX files, 10 for
    # mnist, fashion_mnist and kmnist). Every label must lie in [0, num_classes).
    "num_classes": Field(
        0,
        Rule(
            "0 (the dataset's count) or an int >= 2",
            lambda v: integer(0).why(v) or (v == 1 and "one class is no classification") or None,
        ),
    ),  # fmt: skip
    "num_train_examples": Field(0, integer(0)),  # 0 = all; else the first N.
    "num_test_examples": Field(0, integer(0)),
    "validation_examples": Field(0, integer(0)),  # Held out from the end of the training set.
    # folder:PATH datasets: every picture is converted to this many channels
    # (1 grayscale, 3 RGB) and resized to this (height, width).
    "image_channels": Field(1, Rule("1 or 3", lambda v: None if v in (1, 3) else "not 1 or 3")),
    "image_size": Field((28, 28), image_size()),
    "permute_pixels": Field(False, boolean()),  # Every image's pixels by one fixed permutation.
    # memory: whole splits in host memory. grain: training batches streamed from
    # ArrayRecord files through Grain (docs/guide/grain.md).
    "input_pipeline": Field("memory", choice_of("cnnflat_jax.data.input_pipeline", "PIPELINES")),
    # grain: files from python -m cnnflat_jax.array_records; "" = TFDS's
    # ArrayRecord data source (the dataset prepared with that file format).
    "array_record_dir": Field("", existing_directory()),
    "optimizer": Field("adam", choice_of(_TRAIN_LIB, "OPTIMIZERS")),
    "learning_rate": Field(2e-3, number(0, low_open=True)),
    "momentum": Field(0.9, number(0, 1, high_open=True)),  # sgd only
    "weight_decay": Field(0.0, number(0)),  # adamw only
    "schedule": Field("warmup_cosine", choice_of(_TRAIN_LIB, "SCHEDULES")),
    "warmup_epochs": Field(1.0, number(0)),
    # Every training image moves by a random shift of up to N pixels each step
    # (zero fill; 0 = off).
    "augment_shift": Field(0, integer(0)),
    # The model's arithmetic; parameters, optimizer state and sums stay float32.
    # bfloat16 is for TPUs (and GPUs); on CPUs it is slower than float32.
    "compute_dtype": Field("float32", choice_of(_TRAIN_LIB, "COMPUTE_DTYPES")),
    "batch_size": Field(128, integer(1)),
    "eval_batch_size": Field(1000, integer(1)),
    "num_epochs": Field(10, integer(1)),
    "seed": Field(0, _SEED),
    # Data parallelism (train/sharding.py): the global batch is split over
    # num_devices devices (0 = all, across all processes); the data order is
    # defined over data_shards shards (0 = one per process).
    "num_devices": Field(0, integer(0)),
    "data_shards": Field(0, integer(0)),
    # Checkpoints in workdir/checkpoints: every N steps (rounded to whole
    # dispatches) and at each epoch end; a rerun with the same workdir resumes.
    "checkpoint_every_steps": Field(1000, integer(1), identity=False),
    "checkpoints_to_keep": Field(3, integer(1), identity=False),
    # A gs:// workdir's lock is a lease (run/lease.py): a run that is gone holds
    # it this many seconds after its last renewal (every quarter of it).
    "workdir_lease_sec": Field(60.0, number(2), identity=False),
    # Several processes: one not heard from for this many seconds counts as lost
    # (killed, its host gone), and the others stop (JAX's heartbeat timeout).
    "peer_timeout_sec": Field(100, integer(2), identity=False),
    "loop": Field("compiled", choice_of(_TRAIN_LIB, "LOOPS")),
    # JAX's persistent compilation cache (train/compilation_cache.py): a rerun
    # loads its programs from disk. False, or CNNFLAT_COMPILATION_CACHE=0: off.
    "compilation_cache": Field(True, boolean(), identity=False),
    "steps_per_dispatch": Field(50, integer(1)),  # Steps per compiled program call.
    "progress_bar": Field(True, boolean(), identity=False),
    # > 0: stop once an epoch reaches it.
    "stop_at_test_accuracy": Field(0.0, number(0, 1), identity=False),
    # Divergence guard: a step whose mean training loss is NaN, Inf or above
    # max_loss stops the run (exit 1), keeping the last good checkpoint. 0 = NaN/Inf only.
    "max_loss": Field(1e4, number(0), identity=False),
    # K models in one program (vmap). Lists give one value per member; empty
    # lists use the values above (seeds: seed, seed + 1, ...).
    "population.size": Field(1, integer(1)),
    "population.seeds": Field((), sequence(_SEED)),
    "population.learning_rates": Field((), sequence(number(0, low_open=True))),
    "population.weight_decays": Field((), sequence(number(0))),
    "population.momenta": Field((), sequence(number(0, 1, high_open=True))),
    # True: each member's data order from its seed.
    "population.independent_data_order": Field(False, boolean()),
    # Per-example gradients: DP-SGD clipping + noise (on when clip_norm > 0),
    # and a grid of the training examples with the largest gradient norms.
    "per_example.clip_norm": Field(0.0, number(0)),
    "per_example.noise_multiplier": Field(0.0, number(0)),
    # > 0: how many to show in hardest_examples.png; how many examples to score.
    "per_example.report_hardest": Field(0, integer(0), identity=False),
    "per_example.report_scan_examples": Field(5000, integer(1), identity=False),
}

# config.model's fields, all part of the identity; which of them a model takes
# is its class's business. A default of None: not in the default model.
MODEL_FIELDS: dict[str, Field] = {
    "name": Field("cnn", choice_of(_MODELS, "MODELS")),
    "conv_features": Field((32, 64), sequence(integer(1), non_empty=True)),
    "kernel_size": Field(3, integer(1)),
    "padding": Field("SAME", choice_of(_MODELS, "PADDINGS")),  # The convs'; pools are VALID.
    # No pooling = "stride": the convs stride by pool_window.
    "pool": Field("max", choice_of(_MODELS, "POOL_KINDS")),
    "pool_window": Field(2, integer(1)),
    "dense_features": Field((256,), sequence(integer(1))),
    "permute_flat": Field(False, boolean()),  # The flattened vector by one fixed permutation.
    # ops.conv2d's lowering.
    "conv_lowering": Field("auto", choice_of("cnnflat_jax.nn.ops", "CONV_LOWERINGS")),
    "layers": Field(
        None, Rule("a tuple of layer specs: " + layers.USAGE, lambda v: _layers_fault(v))
    ),
}


def defaults() -> ml_collections.ConfigDict:
    """The default config: every field of ``FIELDS`` and ``MODEL_FIELDS`` at its default."""
    tree: dict[str, Any] = {}
    for key, field in FIELDS.items():
        *groups, leaf = key.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = field.default
    tree["model"] = {k: f.default for k, f in MODEL_FIELDS.items() if f.default is not None}
    return ml_collections.ConfigDict(tree)


def is_identity(key: str) -> bool:
    """Whether the field ``key`` (flat, as ``flat_fields`` names it) is part of
    the run's identity; config.model's fields all are."""
    return key.startswith("model.") or FIELDS[key].identity


def _layers_fault(specs: Any) -> str | None:
    if not isinstance(specs, (tuple, list)) or not specs:
        return "not a non-empty tuple"
    try:
        layers.parse(specs)
    except layers.SpecError as e:
        return str(e)
    return None


def _is_group(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def flat_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"population.size": 1, "model.name": "cnn", ...}``: a nested config's leaves,
    with tuples as lists (as in ``config.json``)."""
    leaves = {}
    for key, value in config.items():
        if _is_group(value):
            leaves.update({f"{key}.{k}": v for k, v in flat_fields(value).items()})
        else:
            leaves[key] = list(value) if isinstance(value, tuple) else value
    return leaves


def default_fields() -> dict[str, Any]:
    """The default config's fields and values, flat (``flat_fields``)."""
    return flat_fields(defaults())


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
    if not _is_group(config.get("model")):
        raise ConfigError("model", config.get("model"), "not a group of fields", "a ConfigDict")
    for key, field in FIELDS.items():
        _check_rule(key, fields[key], field.rule)
    _check_model(config.model)
    _check_population(config)
    _check_devices(config)


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


def _check_devices(config: ml_collections.ConfigDict) -> None:
    """Limits that depend on this run's devices and processes."""
    import jax

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
    data_shards = config.data_shards or processes
    if data_shards % processes:
        raise ConfigError(
            "data_shards", config.data_shards,
            f"not a multiple of the {processes} processes", f"a multiple of {processes}",
        )  # fmt: skip
    num_devices = config.num_devices or devices
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
    import jax

    data_shards = config.data_shards or jax.process_count()
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
    if config.model.name == "cnn":
        _check_cnn_sizes(config.model, image_shape)
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


def _check_cnn_sizes(model: Mapping[str, Any], image_shape: tuple[int, ...]) -> None:
    """Every conv kernel and pooling window must fit the map it slides over."""
    from cnnflat_jax.nn import models

    fields = {**models.CNN.__dataclass_fields__, **model}

    def value(key):
        field = fields[key]
        return field.default if isinstance(field, dataclasses.Field) else field

    kernel, window, pool, padding = (
        value(key) for key in ("kernel_size", "pool_window", "pool", "padding")
    )
    height, width = image_shape[:2]
    for i, _ in enumerate(value("conv_features")):
        # VALID: the kernel must fit the map. SAME: each tap must touch it somewhere.
        size = min(height, width)
        limit = size if padding == "VALID" else 2 * size - 1
        if kernel > limit:
            raise ConfigError(
                "model.kernel_size", kernel,
                f"too large for the {height}x{width} map of conv layer {i} ({padding} padding)",
                f"1 to {limit}",
            )  # fmt: skip
        if padding == "VALID":
            height, width = height - kernel + 1, width - kernel + 1
        if window > min(height, width):
            raise ConfigError(
                "model.pool_window", window,
                f"larger than the {height}x{width} map after conv layer {i}",
                f"1 to {min(height, width)}",
            )  # fmt: skip
        if pool == "stride":  # The conv strides by the window, SAME or VALID alike.
            height, width = -(-height // window), -(-width // window)
        else:
            height, width = height // window, width // window
