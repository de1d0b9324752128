"""Pre-flight check for a Cloud TPU slice, on any machine: ``python -m cnnflat_jax.tpu_check``.

    python -m cnnflat_jax.tpu_check --config configs/tpu.py --topology v5e:4x4
    python -m cnnflat_jax.tpu_check --config configs/tpu.py --topology v5p:2x2x2 \\
        --config.compute_dtype=bfloat16

It builds the programs that ``train.py`` builds (the training loop of
``config.steps_per_dispatch`` steps with its dispatch, a population's when
the config has one, and eval), for the slice's mesh, and compiles them ahead
of time with the TPU compiler (``libtpu``: ``pip install -e '.[tpu]'``), no
TPU needed. Every host process of a multi-host slice compiles this same
SPMD program over the whole slice and feeds its share of the global batch.
It prints, per chip: the memory (arguments, temporaries, code) against the
chip's HBM, the FLOPs of one training step from XLA's cost analysis, the
collectives in the training program, and the images/s the FLOPs allow at
the chip's peak. A config that does not fit, or a batch that does not split
over the slice, is one ``error:`` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from cnnflat_jax import config as config_lib
from cnnflat_jax import configs
from cnnflat_jax.data import batching, catalog
from cnnflat_jax.errors import Error
from cnnflat_jax.tools import command
from cnnflat_jax.train import programs, sharding

__all__ = ["CHIPS", "Chip", "DATASETS", "PreflightError", "Report", "check", "main"]


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's public figures, per chip."""

    hbm_gib: float
    bf16_tflops: float  # Peak dense bfloat16 matrix throughput.
    axes: int = 2  # A slice's shape: 2 sizes (v5e:4x4) or 3 (v5p:2x2x2).


# Cloud TPU's published per-chip figures.
CHIPS = {
    "v4": Chip(32, 275, axes=3),
    "v5e": Chip(16, 197, axes=2),
    "v5p": Chip(95, 459, axes=3),
    "v6e": Chip(32, 918, axes=2),
}

# What a dataset's images look like, without reading it (the data catalog's):
# (image shape, classes, training examples, test examples).
DATASETS = {
    name: (entry.image_shape, entry.num_classes, entry.train_examples, entry.test_examples)
    for name, entry in catalog.CATALOG.items()
}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


class PreflightError(Error, ValueError):
    """The config cannot run on the slice: a batch that does not split, or too
    little memory."""


@dataclasses.dataclass(frozen=True)
class Report:
    """What ``check`` found; ``str(report)`` is the printed table."""

    topology: str
    chips: int
    processes: int
    chip: Chip
    memory: dict[str, dict[str, int]]  # program -> argument/output/temp/code bytes per chip
    step_flops: float  # One training step, all chips together.
    images_per_step: int
    collectives: dict[str, int]  # In the training program, per step (its loop body).
    compute_dtype: str

    @property
    def peak_images_per_sec(self) -> float:
        return self.chips * self.chip.bf16_tflops * 1e12 / (self.step_flops / self.images_per_step)

    def __str__(self) -> str:
        hbm = self.chip.hbm_gib * 2**30
        lines = [
            f"{self.topology}: {self.chips} chips, {self.processes} host process(es); "
            f"compute {self.compute_dtype}; {_gib(hbm)} HBM per chip",
            "memory per chip       arguments     outputs   temporary        code       total",
        ]
        for name, sizes in self.memory.items():
            total = _resident(sizes)
            lines.append(
                f"  {name:<17}" + "".join(f"{_gib(sizes[k]):>12}" for k in _SIZES)
                + f"{_gib(total):>12}  ({100 * total / hbm:.1f}% of HBM)"
            )  # fmt: skip
        per_image = self.step_flops / self.images_per_step
        lines += [
            f"FLOPs per step: {self.step_flops / 1e9:.2f} GFLOP ({self.images_per_step} images, "
            f"{per_image / 1e6:.1f} MFLOP per image), {self.step_flops / self.chips / 1e9:.2f} "
            "GFLOP per chip",
            "collectives per step: "
            + (", ".join(f"{n} {kind}" for kind, n in self.collectives.items()) or "none"),
            f"at the chips' bf16 peak ({self.chip.bf16_tflops:g} TFLOP/s each): at most "
            f"{self.peak_images_per_sec:,.0f} images/s (a bound: small convolutions reach a "
            "fraction of it)",
        ]
        return "\n".join(lines)


_SIZES = ("argument", "output", "temp", "code")


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def _resident(sizes: dict[str, int]) -> int:
    """Bytes a program holds at once: its outputs reuse donated arguments."""
    return sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + sizes["code"]


def _memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    analysis = compiled.memory_analysis()
    return {
        "argument": analysis.argument_size_in_bytes,
        "output": analysis.output_size_in_bytes,
        "alias": analysis.alias_size_in_bytes,
        "temp": analysis.temp_size_in_bytes,
        "code": analysis.generated_code_size_in_bytes,
    }


def _flops(compiled: jax.stages.Compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def count_collectives(hlo: str) -> dict[str, int]:
    """How many of each collective the HLO text has (an async pair counts once)."""
    counts = {}
    for kind in COLLECTIVES:
        # An instruction's line: its name, "=", its type (which may hold "=" in
        # comments such as /*index=5*/), then the op and its operands.
        n = len(re.findall(rf"^\s*(?:ROOT\s+)?\S+ = .*? {kind}(?:-start)?\(", hlo, re.MULTILINE))
        if n:
            counts[kind] = n
    return counts


def _slice(topology: str):
    from jax.experimental import topologies

    generation, _, shape = topology.partition(":")
    if generation in CHIPS:  # Checked here: libtpu crashes the process on some bad shapes.
        axes = CHIPS[generation].axes
        dims = shape.split("x")
        if len(dims) != axes or not all(d.isdigit() and int(d) > 0 for d in dims):
            example = "x".join(["2"] * axes)
            raise PreflightError(
                f"TPU topology {topology!r}: a {generation} slice is {axes} sizes of at least "
                f"1 chip, such as {generation}:{example}"
            )
    try:
        description = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # No libtpu, or a name libtpu does not know.
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PreflightError(
            f"cannot describe TPU topology {topology!r} ({first}); names look like v5e:4x4 or "
            "v5p:2x2x2, and the TPU compiler comes with pip install -e '.[tpu]'"
        ) from None
    generation = topology.split(":")[0]
    if generation not in CHIPS:
        raise PreflightError(f"no chip figures for {generation!r}; known: {', '.join(CHIPS)}")
    devices = sorted(description.devices, key=lambda d: (d.process_index, d.id))
    return devices, CHIPS[generation]


def _abstract(tree: Any, target: jax.sharding.Sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target), tree)


def check(
    config: ml_collections.ConfigDict, topology: str, dataset_shape: tuple | None = None
) -> Report:
    """Compiles ``config``'s programs for ``topology`` and reports what they need.

    Args:
      config: a ``train.py`` config.
      topology: a Cloud TPU slice, e.g. ``"v5e:4x4"``.
      dataset_shape: ``(image shape, classes, train examples, test examples)``;
        by default from ``DATASETS``.

    Raises:
      PreflightError: an unknown topology or dataset; a batch that does not
        split over the chips; programs that need more than a chip's HBM.
      config.ConfigError: a bad config.
    """
    config_lib.check(config)
    devices, chip = _slice(topology)
    if dataset_shape is None:
        if config.dataset not in DATASETS:
            raise PreflightError(
                f"no shape on record for dataset {config.dataset!r} (known: "
                f"{', '.join(DATASETS)}); give --image_shape and --num_classes"
            )
        dataset_shape = DATASETS[config.dataset]
    image_shape, num_classes, train_total, test_total = dataset_shape
    num_classes = config.num_classes or num_classes
    chips = sharding.device_count(config.num_devices, devices)
    processes = len({d.process_index for d in devices[:chips]})
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % chips:
            raise PreflightError(
                f"config.{field}={config[field]} does not split over {chips} chips of "
                f"{topology}: use a multiple of {chips}"
            )
    mesh = jax.sharding.Mesh(np.array(devices[:chips]), (sharding.AXIS,))
    replicated = sharding.replicated(mesh)
    train_examples = (config.num_train_examples or train_total) - config.validation_examples
    steps = batching.steps_per_epoch(train_examples, config.batch_size)
    # Built here (on this machine's CPU: a small model), then only its shapes go on.
    begun = programs.start(config, image_shape, num_classes, steps, mesh=None)
    state, team = _abstract(begun.state, replicated), begun.team
    dispatch = programs.steps_per_dispatch(config, steps)
    with _fits(f"train ({dispatch} steps)", topology):
        train = programs.train_program(config, state, team, mesh, image_shape, steps)
        one_step = programs.train_program(
            config, state, team, mesh, image_shape, steps, loop="per_step", steps=1
        )
    eval_batches = -(-(config.num_test_examples or test_total) // config.eval_batch_size)
    split = sharding.batch_sharding(mesh, 1)
    shape = (eval_batches, config.eval_batch_size)
    eval_arrays = (
        jax.ShapeDtypeStruct((*shape, *image_shape), np.uint8, sharding=split),
        jax.ShapeDtypeStruct(shape, np.int32, sharding=split),
        jax.ShapeDtypeStruct(shape, np.float32, sharding=split),
    )
    with _fits("eval", topology):
        evaluate = programs.eval_programs(state, team, {"test": eval_arrays})["test"]
    report = Report(
        topology=topology,
        chips=chips,
        processes=processes,
        chip=chip,
        memory={
            f"train ({dispatch} steps)": _memory(train.compiled),
            "eval": _memory(evaluate),
        },
        step_flops=_flops(one_step.compiled) * chips,
        images_per_step=config.batch_size * team.size,
        collectives=count_collectives(one_step.compiled.as_text()),
        compute_dtype=config.compute_dtype,
    )
    for name, sizes in report.memory.items():
        if _resident(sizes) > chip.hbm_gib * 2**30:
            raise _too_large(name, _gib(_resident(sizes)), topology)
    return report


_SMALLER = "lower config.batch_size, config.steps_per_dispatch or config.eval_batch_size"


def _too_large(program: str, needed: str, topology: str) -> PreflightError:
    generation = topology.split(":")[0]
    return PreflightError(
        f"the {program} program needs {needed} per chip, more than a {generation} chip's "
        f"{_gib(CHIPS[generation].hbm_gib * 2**30)} of HBM: {_SMALLER}"
    )


@contextlib.contextmanager
def _fits(program: str, topology: str):
    """Turns the TPU compiler's own out-of-memory refusal into a ``PreflightError``."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed = re.search(r"required for HLO temporaries \(([\d.]+[KMGTPE])\)", str(e))
        what = f"{needed[1]}iB of temporaries" if needed else "temporaries of a size it did not say"
        raise _too_large(program, what, topology) from None


def main() -> None:
    """The command line (flags are defined here, so importing the module defines none)."""
    from absl import app, flags
    from ml_collections import config_flags

    with command.config_errors(sys.argv):  # An unknown --config.FIELD fails here.
        config_flag = config_flags.DEFINE_config_file(
            "config", configs.path("tpu"), "A train.py config: a file, or a shipped config's name."
        )
    topology = flags.DEFINE_string("topology", "v5e:2x2", "A Cloud TPU slice, e.g. v5e:4x4.")
    image_shape = flags.DEFINE_list("image_shape", None, "H,W,C for a dataset not on record.")
    num_classes = flags.DEFINE_integer("num_classes", 10, "Its classes.")
    examples = flags.DEFINE_list("examples", ["60000", "10000"], "Its train,test sizes.")

    def run(argv):
        if len(argv) > 1:
            command.usage(__doc__.splitlines()[0])
        # A compile-only TPU client cannot load a program back from JAX's persistent
        # cache ($JAX_COMPILATION_CACHE_DIR): each would be a warning, then compiled.
        jax.config.update("jax_enable_compilation_cache", False)
        with command.config_errors(sys.argv):
            config = config_flag.value
            config.keys()  # A config file that failed to load raises on first use.
        shape = None
        if image_shape.value:
            sizes = [_positive(n) for n in (*image_shape.value, *examples.value)]
            if len(image_shape.value) != 3 or len(examples.value) != 2 or None in sizes:
                command.fail(
                    f"--image_shape={','.join(image_shape.value)} "
                    f"--examples={','.join(examples.value)}: not H,W,C and TRAIN,TEST "
                    "(integers >= 1)"
                )
            if num_classes.value < 1:
                command.fail(f"--num_classes={num_classes.value}: not an integer >= 1")
            shape = (tuple(sizes[:3]), num_classes.value, *sizes[3:])
        with command.one_line_failures():
            print(check(config, topology.value, shape))

    app.run(run, flags_parser=command.parse_config_flags)


def _positive(text: str) -> int | None:
    """``text`` as an integer >= 1, or None."""
    return int(text) if text.strip().isdigit() and int(text) > 0 else None
