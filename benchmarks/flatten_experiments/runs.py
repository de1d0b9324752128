"""The trained models behind docs/flatten.md: the variants, their learning rates, their runs.

Every variant is a config of ``train.py``'s own trainer (``configs/default.py`` plus a
few overrides). Its learning rate is chosen per variant from a grid (``Plan.learning_rates``,
grown while an end is best) by validation accuracy (seed 0, the last ``1/6`` of the
training images held out, the test set untouched); then ``Plan.seeds`` models train on
all training images with it, and ``Plan.more_seeds`` for the variants in ``Plan.more``
(those the write-up compares with a variant less than a point away). A variant with a
smaller training set uses its full-set variant's learning rate.

Each model trains alone on one CPU core, ``Plan.workers`` at a time (on the 2-core
machine two one-core runs do 1.6x the work of one two-core run in the same time),
so a model's numbers do not depend on how many run beside it: the same seed gives
the same model bit for bit. Right after training, on the same core, each seed is
measured (``measures.measure_seed``) and leaves ``measures.json``: with its
``config.json``, ``metrics.jsonl`` and ``run_sec.json`` (a few kilobytes), all the
tables need. Runs are kept under ``Plan.out`` and reused; one whose parameters are
gone retrains, bit for bit the same, only when a measurement needs its model.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cnnflat_jax import config as config_lib
from cnnflat_jax.configs import default
from cnnflat_jax.data import idx, input_pipeline, transforms
from cnnflat_jax.nn import layers, models
from cnnflat_jax.run import run_state, trained_run, trainer
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.train import evaluation


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to train: where, how many seeds and epochs, which images, how many at once."""

    out: str
    seeds: int = 5
    more_seeds: int = 10  # For the variants in ``more``.
    epochs: int = 1
    train_images: int = 60_000
    test_images: int = 0  # 0: all 10,000.
    workers: int = 2  # Models training at once, one core each.
    more: frozenset = frozenset()  # The variants that get ``more_seeds``.
    learning_rates: tuple = (2e-3, 4e-3, 8e-3, 1.6e-2)  # The grid; default.py: 2e-3.
    rate_range: tuple = (2.5e-4, 0.256)  # The lowest and highest rates the grid grows to.

    def seed_count(self, name: str) -> int:
        return self.more_seeds if name in self.more else self.seeds


DIVERGED = "diverged.json"  # In a run directory: the loss diverged; the error.
RUN_SEC = "run_sec.json"  # In a run directory: the seconds the run took, once finished.
MEASURES = "measures.json"  # In a seed's run directory: what the tables need of its model.
CANVAS = 36  # The padded canvas: 4 pixels of zeros round each 28x28 image.
SMALLER = (500, 2_000, 10_000)  # Training-set sizes below the full one.
MLP = {"name": "mlp", "dense_features": (1024,)}  # About the CNN's parameter count.
# configs/default.py's CNN as layer specs, and variants of it.
CNN = ("conv:32:3", "relu", "max_pool:2", "conv:64:3", "relu", "max_pool:2")
HEAD = ("dense:256", "relu", "dense:10")
# Zhang (2019)'s MaxBlurPool: a max over 2x2 windows at stride 1, then a [1, 2, 1]/4
# blur (two 2x2 means at stride 1 and 2) before keeping every other position.
BLUR_POOL = ("max_pool:2:stride=1:padding=0x1x0x1", "avg_pool:2:stride=1:padding=1x0x1x0",
             "avg_pool:2")  # fmt: skip

# A max over the whole of the CNN's 7x7 maps: one value per channel, as global_avg_pool.
GLOBAL_MAX_POOL = ("max_pool:7", "flatten")


def sequential(*specs: str) -> dict:
    return {"name": "sequential", "layers": specs}


@dataclasses.dataclass(frozen=True)
class Variant:
    """Overrides of ``configs/default.py``, and the training images: "fashion"
    (Fashion-MNIST), "padded" (on a CANVAS x CANVAS canvas) or a size N."""

    overrides: dict
    data: str | int = "fashion"


VARIANTS = {
    "CNN": Variant({}),
    "CNN, avg pool": Variant({"model.pool": "avg"}),
    "CNN, anti-aliased max pool": Variant(
        {"model": sequential(*CNN[:2], *BLUR_POOL, *CNN[3:5], *BLUR_POOL, "flatten", *HEAD)}
    ),
    "CNN, no pool (stride-2 convs)": Variant({"model.pool": "stride"}),
    "CNN, max pool 3": Variant({"model.pool_window": 3}),
    "CNN, avg pool 3": Variant({"model.pool": "avg", "model.pool_window": 3}),
    "CNN, no ReLU": Variant(
        {"model": sequential(*(s for s in (*CNN, "flatten", *HEAD) if s != "relu"))}
    ),
    "GAP CNN": Variant({"model": sequential(*CNN, "global_avg_pool", *HEAD)}),
    "GMP CNN (global max pool)": Variant({"model": sequential(*CNN, *GLOBAL_MAX_POOL, *HEAD)}),
    "GAP CNN, deeper": Variant(
        {"model": sequential(*CNN, "conv:128:3", "relu", "max_pool:2", "global_avg_pool", *HEAD)}
    ),
    "CNN, no downsampling": Variant(
        {"model": sequential("conv:32:3", "relu", "conv:64:3", "relu", "flatten", *HEAD)}
    ),
    "CNN, no downsampling, dilated": Variant(
        {
            "model": sequential(
                "conv:32:3:padding=valid",
                "relu",
                "conv:64:3:padding=valid:dilation=4",
                "relu",
                "flatten",
                *HEAD,
            )
        }
    ),  # fmt: skip
    "MLP": Variant({"model": MLP}),
    "CNN, shuffled pixels": Variant({"permute_pixels": True}),
    "MLP, shuffled pixels": Variant({"permute_pixels": True, "model": MLP}),
    "CNN, permuted flatten": Variant({"model.permute_flat": True}),
    "CNN, shift-augmented": Variant({"augment_shift": 4}),
    "CNN, padded canvas": Variant({}, "padded"),
    "GAP CNN, padded canvas": Variant(
        {"model": sequential(*CNN, "global_avg_pool", *HEAD)}, "padded"
    ),
    "MLP, padded canvas": Variant({"model": MLP}, "padded"),
}
EFFICIENCY = ("CNN", "CNN, no pool (stride-2 convs)", "GAP CNN", "MLP")
for _name in EFFICIENCY:
    for _size in SMALLER:
        VARIANTS[f"{_name}, {_size} images"] = dataclasses.replace(VARIANTS[_name], data=_size)
MAIN = [name for name, v in VARIANTS.items() if not isinstance(v.data, int)]


def base_variant(name: str) -> str:
    """The full-set variant that a smaller-set variant shrinks (else ``name``)."""
    data = VARIANTS[name].data
    return name.removesuffix(f", {data} images") if isinstance(data, int) else name


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def run_dir(plan: Plan, name: str) -> str:
    """Where variant ``name``'s seeds are trained and kept."""
    return os.path.join(plan.out, "runs", slug(name))


def seed_dirs(plan: Plan, name: str) -> list[str]:
    """Where each seed of variant ``name`` is trained and kept."""
    workdir = run_dir(plan, name)
    return [os.path.join(workdir, f"seed_{k}") for k in range(plan.seed_count(name))]


def fashion(plan: Plan) -> input_pipeline.Dataset:
    part = input_pipeline.Part(num_train=plan.train_images, num_test=plan.test_images)
    return input_pipeline.load_dataset("fashion_mnist", part=part)


def pad(images: np.ndarray) -> np.ndarray:
    """Centres 28x28 images on the CANVAS x CANVAS canvas."""
    border = (CANVAS - images.shape[1]) // 2
    return np.pad(images, ((0, 0), (border, border), (border, border), (0, 0)))


def test_images(name: str, data: input_pipeline.Dataset) -> np.ndarray:
    """The test images as variant ``name`` sees them."""
    return pad(data.test_images) if VARIANTS[name].data == "padded" else data.test_images


def train_images(name: str, data: input_pipeline.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Variant ``name``'s distinct training images, as it sees them, and their labels."""
    variant = VARIANTS[name]
    size = variant.data if isinstance(variant.data, int) else len(data.train.labels)
    images, labels = data.train.images[:size], data.train.labels[:size]
    return (pad(images) if variant.data == "padded" else images), labels


def data_dir(plan: Plan, kind: str | int, data: input_pipeline.Dataset) -> str:
    """An IDX directory for ``kind`` under ``plan.out/data``, written on first use."""
    directory = os.path.join(plan.out, "data", str(kind))
    if os.path.isdir(directory):
        return directory
    train, test = (data.train.images, data.train.labels), (data.test_images, data.test_labels)
    if kind == "padded":
        train, test = (pad(train[0]), train[1]), (pad(test[0]), test[1])
    else:
        repeat = plan.train_images // kind
        train = (np.tile(train[0][:kind], (repeat, 1, 1, 1)), np.tile(train[1][:kind], repeat))
    partial = directory + ".partial"
    os.makedirs(partial, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        idx.write_idx(os.path.join(partial, f"{prefix}-images-idx3-ubyte"), images[..., 0])
        idx.write_idx(os.path.join(partial, f"{prefix}-labels-idx1-ubyte"), labels)
    os.rename(partial, directory)
    return directory


def variant_config(name, data, plan: Plan, learning_rate: float):
    variant = VARIANTS[name]
    config = default.get_config()
    config.num_epochs = plan.epochs
    config.warmup_epochs = min(config.warmup_epochs, config.num_epochs / 4)
    config.learning_rate = learning_rate
    config.progress_bar = False
    if variant.data != "fashion":
        config.data_source, config.idx_dir = "idx", data_dir(plan, variant.data, data)
    elif plan.train_images != 60_000:
        config.num_train_examples = plan.train_images
    config.num_test_examples = plan.test_images
    for key, value in variant.overrides.items():
        if key == "model":
            config.model = type(config.model)(value)
        elif key.startswith("model."):
            config.model[key.removeprefix("model.")] = value
        else:
            config[key] = value
    return config


def _pin(cores) -> None:
    """A pool worker's start: this process runs on one core from ``cores`` (so XLA
    sizes its thread pool to one), before JAX first touches the CPU."""
    os.sched_setaffinity(0, {cores.get()})


def _train(config, workdir: str, measure=None) -> dict:
    """One run, then ``measure(workdir)`` (if given) kept as its MEASURES; a run whose
    loss diverged scores 0 (the learning-rate grid's top may) and is not measured."""
    start = time.perf_counter()
    try:
        record = trainer.train_and_evaluate(config, workdir)
    except run_state.DivergedError as e:
        record = {"diverged": str(e), "validation_accuracy": 0.0, "test_accuracy": 0.0}
        with open(workdir_lib.path(workdir, DIVERGED), "w") as f:
            json.dump(record, f)
    else:
        if measure is not None:
            workdir_lib.write_json(workdir_lib.path(workdir, MEASURES), measure(workdir))
    return {**record, "run_sec": time.perf_counter() - start}


def finished(workdir: str, config, measured: bool = False, params: bool = False) -> dict | None:
    """The last record of a run that completed (or diverged on) ``config`` in ``workdir``,
    or None; also None when it lacks its MEASURES (``measured``) or its final
    parameters (``params``)."""
    try:
        if workdir_lib.read_config(workdir) != config_lib.as_json(config):
            return None
        if os.path.exists(workdir_lib.path(workdir, DIVERGED)):
            with open(workdir_lib.path(workdir, DIVERGED)) as f:
                diverged = json.load(f)
            return {**diverged, "run_sec": run_seconds(workdir)}
        records = read_metrics(workdir)
    except (OSError, workdir_lib.RunError):
        return None
    needed = [MEASURES] * measured + [workdir_lib.FINAL_PARAMS] * params
    if not all(os.path.exists(workdir_lib.path(workdir, name)) for name in needed):
        return None
    last = records[-1] if records else {}
    return last if last.get("epoch") == config.num_epochs and "run_sec" in last else None


def parallel(function, jobs: dict, workers: int) -> Iterator[tuple]:
    """``(key, function(*args))`` for each ``key -> args`` of ``jobs`` as each finishes,
    in ``workers`` processes of one CPU core each (``function`` must be importable: the
    processes are spawned)."""
    context = multiprocessing.get_context("spawn")
    cores = context.Queue()
    allowed = sorted(os.sched_getaffinity(0))
    for i in range(workers):
        cores.put(allowed[i % len(allowed)])
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_pin, initargs=(cores,)
    ) as pool:
        futures = {pool.submit(function, *args): key for key, args in jobs.items()}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def train_all(jobs: dict[str, tuple], workers: int, params: bool = False) -> dict[str, dict]:
    """Trains each ``workdir -> (config, measure or None)`` (one core each, ``workers``
    at once; a run that already finished, measured, and with its parameters if
    ``params``, is read back), and returns each run's last record with its ``run_sec``:
    the seconds it took, evaluation and measurement included. A run to redo starts
    afresh (an interrupted one resumes from its checkpoint)."""
    results, todo = {}, {}
    for workdir, (config, measure) in jobs.items():
        record = finished(workdir, config, measure is not None, params)
        if record is not None:
            results[workdir] = record
            continue
        if finished(workdir, config) is not None:  # Finished, but lacks what is needed.
            shutil.rmtree(workdir)
        todo[workdir] = (config, workdir, measure)
    for workdir, record in parallel(_train, todo, workers) if todo else ():
        with open(workdir_lib.path(workdir, RUN_SEC), "w") as f:
            json.dump(record["run_sec"], f)
        results[workdir] = record
    return results


def run_seconds(workdir: str) -> float | None:
    """What ``train_all`` measured for the run in ``workdir``, if it finished."""
    path = workdir_lib.path(workdir, RUN_SEC)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_metrics(workdir: str) -> list[dict]:
    """The run's records, the last with its ``run_sec`` once ``train_all`` finished it."""
    with open(workdir_lib.path(workdir, workdir_lib.METRICS)) as f:
        records = [json.loads(line) for line in f]
    if records and (seconds := run_seconds(workdir)) is not None:
        records[-1]["run_sec"] = seconds
    return records


def choose_learning_rates(names, data, plan: Plan) -> dict[str, dict]:
    """Per variant: validation accuracy at each rate of its grid (seed 0, the last sixth
    of the training images held out), the chosen rate, and the grid's seconds. The grid
    is ``plan.learning_rates``, halved below its bottom while the best rate is the bottom
    and doubled past its top while the best is the top (within ``plan.rate_range``), so
    that the chosen rate lies inside the grid unless it is an end of that range."""
    tuned = dict.fromkeys(base_variant(n) for n in names)
    grids = {name: list(plan.learning_rates) for name in tuned}

    def run_dir_lr(name: str, rate: float) -> str:
        return os.path.join(plan.out, "runs_lr", slug(name), f"lr_{rate:g}")

    while True:
        jobs = {}
        for name, grid in grids.items():
            for rate in grid:
                config = variant_config(name, data, plan, rate)
                config.validation_examples = plan.train_images // 6
                jobs[run_dir_lr(name, rate)] = (config, None)
        results = train_all(jobs, plan.workers)
        accuracy = {
            name: {rate: results[run_dir_lr(name, rate)]["validation_accuracy"] for rate in grid}
            for name, grid in grids.items()
        }
        low, high = plan.rate_range
        grown = False
        for name, grid in grids.items():
            best = max(grid, key=accuracy[name].get)
            if best == grid[0] and grid[0] / 2 >= low:
                grid.insert(0, grid[0] / 2)
                grown = True
            elif best == grid[-1] and 2 * grid[-1] <= high:
                grid.append(2 * grid[-1])
                grown = True
        if not grown:
            break
    choices = {
        name: {
            "validation_accuracy": accuracy[name],
            "learning_rate": max(grid, key=accuracy[name].get),
            "sec": sum(results[run_dir_lr(name, rate)]["run_sec"] for rate in grid),
        }
        for name, grid in grids.items()
    }
    return {name: choices[base_variant(name)] for name in names}


def model_specs(config) -> tuple[str, ...]:
    """The variant's layers as specs (the CNN and MLP presets' own)."""
    return models.layer_specs(models.from_fields(config.model, 10))


def receptive_field(specs) -> int:
    """The receptive field of a unit of the last map before the flatten or global pool."""
    end = len(specs) - len(HEAD) - len(GLOBAL_MAX_POOL)
    if tuple(specs[end : end + len(GLOBAL_MAX_POOL)]) == GLOBAL_MAX_POOL:
        specs = specs[:end]
    return layers.receptive_field(specs)[0]


def parameter_counts(config, image_shape) -> dict[str, int]:
    """All parameters, and those of the first dense layer and of all dense layers (the head)."""
    model = models.from_fields(config.model, 10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"]
    sizes = {
        name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p)) for name, p in shapes.items()
    }
    dense = [size for name, size in sizes.items() if "dense" in name.lower()]
    return {"total": sum(sizes.values()), "first_dense": dense[0], "head": sum(dense)}


def seed_jobs(names, data, plan: Plan, rates: dict, measure) -> dict[str, tuple]:
    """``workdir -> (config, measure)`` of every seed of every variant in ``names`` at its
    chosen rate; ``measure(name, seed)``: what measures that seed once trained."""
    jobs = {}
    for name in names:
        base = variant_config(name, data, plan, rates[name]["learning_rate"])
        for seed, workdir in enumerate(seed_dirs(plan, name)):
            config = base.copy_and_resolve_references()
            config.seed = seed
            jobs[workdir] = (config, measure(name, seed))
    return jobs


def test_accuracies(names, data, plan: Plan, rates: dict, measure) -> dict[str, list[float]]:
    """Trains (or reuses) the seeds of ``names``; their test accuracies, per variant."""
    results = train_all(seed_jobs(names, data, plan, rates, measure), plan.workers)
    return {name: [results[d]["test_accuracy"] for d in seed_dirs(plan, name)] for name in names}


def keep_params(names, data, plan: Plan, rates: dict, measure) -> None:
    """Makes sure seed 0 of each variant in ``names`` has its final parameters (retraining
    it if they are gone), for the figures that draw a model."""
    jobs = seed_jobs(names, data, plan, rates, measure)
    drawn = {d: jobs[d] for d in (seed_dirs(plan, name)[0] for name in names)}
    train_all(drawn, plan.workers, params=True)


def measures(workdir: str) -> dict:
    """What ``measures.measure_seed`` measured of the seed trained in ``workdir``."""
    return workdir_lib.read_json(workdir, MEASURES, "the seed's measurements")


def seed_measures(plan: Plan, name: str, seeds: int | None = None) -> list[dict]:
    """The measures of variant ``name``'s seeds (its first ``seeds``)."""
    return [measures(d) for d in seed_dirs(plan, name)[:seeds]]


def train_variants(names, data, plan: Plan, rates: dict, measure) -> dict[str, dict]:
    """Trains (or reuses) every seed of every variant in ``names`` at its chosen rate,
    and returns their summaries."""
    jobs = seed_jobs(names, data, plan, rates, measure)
    results = train_all(jobs, plan.workers)
    summaries = {}
    for name in names:
        dirs = seed_dirs(plan, name)
        summaries[name] = summarize(name, data, jobs[dirs[0]][0], dirs, [results[d] for d in dirs])
    return summaries


def summarize(name, data, config, dirs: list[str], records: list[dict]) -> dict:
    images, _ = train_images(name, data)
    return {
        "learning_rate": config.learning_rate,
        "test_accuracy": [r["test_accuracy"] for r in records],
        "train_accuracy": [measures(d)["train_accuracy"] for d in dirs],
        "train_images": len(images),
        "steps": records[0]["step"],
        "parameters": parameter_counts(config, images.shape[1:]),
        "receptive_field": receptive_field(model_specs(config)),
        # Per model, training alone: the sum of its epochs' seconds (one core).
        "train_sec_per_model": float(
            np.mean([sum(r["epoch_sec"] for r in read_metrics(d)) for d in dirs])
        ),
        "run_sec": float(sum(r["run_sec"] for r in records)),  # All seeds, measuring too.
    }


def seed_classifiers(dirs: list[str]) -> list:
    """One ``images -> predicted labels`` function per trained run in ``dirs``."""
    classifiers = []
    for workdir in dirs:
        run = trained_run.load_run(workdir)
        config, model, params = run.config, run.model, run.params

        def classify(images, params=params, model=model, config=config):
            if config["permute_pixels"]:
                images = transforms.permute_pixels(images)
            return evaluation.predict(model.apply, params, images)

        classifiers.append(classify)
    return classifiers
