"""The field table: every config field's default, rule and place in the run's identity."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from cnnflat_jax.config.rules import (
    Rule,
    boolean,
    choice_of,
    dataset_name,
    directory,
    existing_directory,
    image_size,
    integer,
    number,
    sequence,
)
from cnnflat_jax.nn import layers, presets


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its default, its rule, and whether it is part of the
    run's identity (a rerun on the same workdir must keep it) or free (how
    the run is watched or stored, not what it computes)."""

    default: Any
    rule: Rule
    identity: bool = True


_SEED = integer(-(2**63), 2**63 - 1)
_OPTIMIZER, _STEP, _TRAIN_LIB = (
    f"cnnflat_jax.train.{m}" for m in ("optimizer", "step", "train_lib")
)
_MODELS = "cnnflat_jax.nn.models"

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
    "optimizer": Field("adam", choice_of(_OPTIMIZER, "OPTIMIZERS")),
    "learning_rate": Field(2e-3, number(0, low_open=True)),
    "momentum": Field(0.9, number(0, 1, high_open=True)),  # sgd only
    "weight_decay": Field(0.0, number(0)),  # adamw only
    "schedule": Field("warmup_cosine", choice_of(_OPTIMIZER, "SCHEDULES")),
    "warmup_epochs": Field(1.0, number(0)),
    # Every training image moves by a random shift of up to N pixels each step
    # (zero fill; 0 = off).
    "augment_shift": Field(0, integer(0)),
    # The model's arithmetic; parameters, optimizer state and sums stay float32.
    # bfloat16 is for TPUs (and GPUs); on CPUs it is slower than float32.
    "compute_dtype": Field("float32", choice_of(_STEP, "COMPUTE_DTYPES")),
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
    # A gs:// workdir's lock is a lease (run/lock.py): a run that is gone holds
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
# is its class's business. A default of None: not in the default model. The
# default model is the CNN preset, with its own defaults.
_CNN = presets.CNN
MODEL_FIELDS: dict[str, Field] = {
    "name": Field("cnn", choice_of(_MODELS, "MODELS")),
    "conv_features": Field(_CNN["conv_features"], sequence(integer(1), non_empty=True)),
    "kernel_size": Field(_CNN["kernel_size"], integer(1)),
    # The convs'; pools are VALID.
    "padding": Field(_CNN["padding"], choice_of(_MODELS, "PADDINGS")),
    # No pooling = "stride": the convs stride by pool_window.
    "pool": Field(_CNN["pool"], choice_of(_MODELS, "POOL_KINDS")),
    "pool_window": Field(_CNN["pool_window"], integer(1)),
    "dense_features": Field(_CNN["dense_features"], sequence(integer(1))),
    # The flattened vector by one fixed permutation.
    "permute_flat": Field(_CNN["permute_flat"], boolean()),
    # ops.conv2d's lowering.
    "conv_lowering": Field(
        _CNN["conv_lowering"], choice_of("cnnflat_jax.nn.ops", "CONV_LOWERINGS")
    ),
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


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON values (tuples as lists): what ``config.json`` and a
    run's checkpoints hold as its identity, and what they are compared with."""
    return json.loads(config.to_json_best_effort())


def is_group(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def flat_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"population.size": 1, "model.name": "cnn", ...}``: a nested config's leaves,
    with tuples as lists (as in ``config.json``)."""
    leaves = {}
    for key, value in config.items():
        if is_group(value):
            leaves.update({f"{key}.{k}": v for k, v in flat_fields(value).items()})
        else:
            leaves[key] = list(value) if isinstance(value, tuple) else value
    return leaves


def default_fields() -> dict[str, Any]:
    """The default config's fields and values, flat (``flat_fields``)."""
    return flat_fields(defaults())
