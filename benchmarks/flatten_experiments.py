"""The experiments behind docs/flatten.md (second edition), every table and figure.

    python -m benchmarks.flatten_experiments --out docs/flatten
    python -m benchmarks.flatten_experiments --out docs/flatten --full_budget

The budget is the same for every variant: ``--num_epochs`` (1) epoch of
60,000 training images, i.e. 469 steps of batch 128, with
``configs/default.py``'s Adam, learning rate and warmup + cosine schedule.
Each variant trains ``--seeds`` (3) models, seeds 0, 1, 2 (initialisation
and data order), each its own run; tables give mean +- std over seeds. A
smaller training set of N images is its first N images repeated 60,000 / N
times, so it too gets the 469 steps. ``--full_budget`` trains one model
(seed 0) per variant for 10 epochs of 60,000 images instead, to check that
the rankings hold.

Writes, to ``--out``: ``accuracy.md`` (every variant: parameters, receptive
field, train and test accuracy), ``invariance.md`` (shifts and rotations),
``shift_controls.md`` (padded canvas, shift augmentation),
``data_efficiency.md``, ``equivariance.md``, ``full_budget.md``, their
figures, and ``explain.png``. Trained runs are kept in ``--out/runs/`` and
reused when rerun with the same config. ``--variant`` (repeatable),
``--train_images`` and ``--test_images`` run a smaller part of it (the
tests do).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import flatten_equivariance, flatten_stats
from benchmarks import flatten_figures as figures
from cnnflat_jax.configs import default
from cnnflat_jax.data import idx, input_pipeline, transforms
from cnnflat_jax.nn import layers, models
from cnnflat_jax.run import trainer
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.tools import explain
from cnnflat_jax.train import evaluation

_OUT = flags.DEFINE_string("out", "docs/flatten", "Where tables, figures and runs go.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Models per variant (seeds 0, 1, ...).")
_EPOCHS = flags.DEFINE_integer("num_epochs", 1, "Epochs of the training set per model.")
_FULL = flags.DEFINE_boolean("full_budget", False, "One seed, 10 epochs: full_budget.md only.")
_VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "Repeatable: train only these and their smaller-set runs (default: all)."
)
_TRAIN_IMAGES = flags.DEFINE_integer("train_images", 60_000, "The first N training images.")
_TEST_IMAGES = flags.DEFINE_integer("test_images", 0, "The first N test images (0 = all).")
_DATA = "data"  # Under --out: the padded and the smaller training sets, as IDX files.

CANVAS = 36  # The padded canvas: 4 pixels of zeros round each 28x28 image.
SHIFTS = (0, 1, 2, 3, 4)
ROTATIONS = (0, 5, 10, 15, 20, 25, 30)
SMALLER = (500, 2_000, 10_000)  # Training-set sizes below the full one.
MLP = {"name": "mlp", "dense_features": (1024,)}  # About the CNN's parameter count.
TRUNK = ("conv:32:3", "relu", "max_pool:2", "conv:64:3", "relu", "max_pool:2")
GAP = {"name": "sequential", "layers": (*TRUNK, "global_avg_pool", "dense:256", "relu", "dense:10")}
NO_DOWNSAMPLING = {
    "name": "sequential",
    "layers": (
        "conv:32:3",
        "relu",
        "conv:64:3",
        "relu",
        "flatten",
        "dense:256",
        "relu",
        "dense:10",
    ),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """Overrides of ``configs/default.py``, and the training images: "fashion"
    (Fashion-MNIST), "padded" (on a CANVAS x CANVAS canvas) or a size N."""

    overrides: dict
    data: str | int = "fashion"


VARIANTS = {
    "CNN": Variant({}),
    "CNN, avg pool": Variant({"model.pool": "avg"}),
    "CNN, no pool (stride-2 convs)": Variant({"model.pool": "stride"}),
    "CNN, max pool 3": Variant({"model.pool_window": 3}),
    "CNN, avg pool 3": Variant({"model.pool": "avg", "model.pool_window": 3}),
    "GAP CNN": Variant({"model": GAP}),
    "CNN, no downsampling": Variant({"model": NO_DOWNSAMPLING}),
    "MLP": Variant({"model": MLP}),
    "CNN, shuffled pixels": Variant({"permute_pixels": True}),
    "MLP, shuffled pixels": Variant({"permute_pixels": True, "model": MLP}),
    "CNN, permuted flatten": Variant({"model.permute_flat": True}),
    "CNN, shift-augmented": Variant({"augment_shift": 4}),
    "CNN, padded canvas": Variant({}, "padded"),
    "GAP CNN, padded canvas": Variant({"model": GAP}, "padded"),
    "MLP, padded canvas": Variant({"model": MLP}, "padded"),
}
EFFICIENCY = ("CNN", "CNN, no pool (stride-2 convs)", "GAP CNN", "MLP")
for _name in EFFICIENCY:
    for _size in SMALLER:
        VARIANTS[f"{_name}, {_size} images"] = dataclasses.replace(VARIANTS[_name], data=_size)
MAIN = [name for name, v in VARIANTS.items() if v.data == "fashion"]
COLORS = figures.palette(MAIN)  # A variant keeps its colour in every figure.
INVARIANCE = ("CNN", "CNN, avg pool", "CNN, no pool (stride-2 convs)", "GAP CNN", "MLP")
# The pairs the write-up compares, each tested on the same test images.
COMPARISONS = (
    ("CNN", "MLP"),
    ("CNN", "GAP CNN"),
    ("CNN", "CNN, avg pool"),
    ("CNN", "CNN, no pool (stride-2 convs)"),
    ("CNN, no downsampling", "CNN"),
    ("CNN", "CNN, permuted flatten"),
    ("CNN", "CNN, shuffled pixels"),
    ("MLP", "MLP, shuffled pixels"),
    ("CNN, max pool 3", "CNN, avg pool 3"),
    ("CNN, padded canvas", "CNN"),
)
CONTROLS = (
    "CNN", "GAP CNN", "MLP", "CNN, padded canvas", "GAP CNN, padded canvas",
    "MLP, padded canvas", "CNN, shift-augmented",
)  # fmt: skip


def efficiency_name(model: str, size: int) -> str:
    return model if size == _TRAIN_IMAGES.value else f"{model}, {size} images"


def sizes() -> list[int]:
    return [n for n in SMALLER if n < _TRAIN_IMAGES.value] + [_TRAIN_IMAGES.value]


def selected() -> list[str]:
    """The variants to train: ``--variant``s (default all) and their smaller-set runs."""
    chosen = _VARIANTS.value or [n for n, v in VARIANTS.items() if not isinstance(v.data, int)]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    smaller = [efficiency_name(m, n) for m in EFFICIENCY if m in chosen for n in sizes()[:-1]]
    return [n for n in VARIANTS if n in chosen or n in smaller]


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def run_dir(name: str, full: bool = False) -> str:
    """Where variant ``name``'s run is trained and kept."""
    return os.path.join(_OUT.value, "runs_full" if full else "runs", slug(name))


def fashion() -> input_pipeline.Dataset:
    part = input_pipeline.Part(num_train=_TRAIN_IMAGES.value, num_test=_TEST_IMAGES.value)
    return input_pipeline.load_dataset("fashion_mnist", part=part)


def pad(images: np.ndarray) -> np.ndarray:
    """Centres 28x28 images on the CANVAS x CANVAS canvas."""
    border = (CANVAS - images.shape[1]) // 2
    return np.pad(images, ((0, 0), (border, border), (border, border), (0, 0)))


def data_dir(kind: str | int, data: input_pipeline.Dataset) -> str:
    """An IDX directory for ``kind`` under ``--out/data``, written on first use."""
    directory = os.path.join(_OUT.value, _DATA, str(kind))
    if os.path.isdir(directory):
        return directory
    train, test = (data.train.images, data.train.labels), (data.test_images, data.test_labels)
    if kind == "padded":
        train, test = (pad(train[0]), train[1]), (pad(test[0]), test[1])
    else:
        repeat = _TRAIN_IMAGES.value // kind
        train = (np.tile(train[0][:kind], (repeat, 1, 1, 1)), np.tile(train[1][:kind], repeat))
    partial = directory + ".partial"
    os.makedirs(partial, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        idx.write_idx(os.path.join(partial, f"{prefix}-images-idx3-ubyte"), images[..., 0])
        idx.write_idx(os.path.join(partial, f"{prefix}-labels-idx1-ubyte"), labels)
    os.rename(partial, directory)
    return directory


def variant_config(name: str, data: input_pipeline.Dataset, full: bool):
    variant = VARIANTS[name]
    config = default.get_config()
    config.num_epochs = 10 if full else _EPOCHS.value
    config.warmup_epochs = min(config.warmup_epochs, config.num_epochs / 4)
    config.progress_bar = False
    if variant.data != "fashion":
        config.data_source, config.idx_dir = "idx", data_dir(variant.data, data)
    elif _TRAIN_IMAGES.value != 60_000:
        config.num_train_examples = _TRAIN_IMAGES.value
    config.num_test_examples = _TEST_IMAGES.value
    for key, value in variant.overrides.items():
        if key == "model":
            config.model = type(config.model)(value)
        elif key.startswith("model."):
            config.model[key.removeprefix("model.")] = value
        else:
            config[key] = value
    return config


def model_specs(config) -> tuple[str, ...]:
    """The variant's layers as specs (the CNN and MLP presets' own)."""
    model = models.from_fields(config.model, 10)
    return model.layers if isinstance(model, models.Sequential) else model.specs()


def parameter_counts(config, image_shape) -> dict[str, int]:
    """All parameters, and those of the first dense layer and of all dense layers (the head)."""
    model = models.from_fields(config.model, 10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"]
    sizes = {
        name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p)) for name, p in shapes.items()
    }
    dense = [size for name, size in sizes.items() if "dense" in name.lower()]
    return {"total": sum(sizes.values()), "first_dense": dense[0], "head": sum(dense)}


def seeds(full: bool = False) -> range:
    return range(1 if full else _SEEDS.value)


def train_variant(name: str, data: input_pipeline.Dataset, full: bool = False) -> dict:
    """Trains (or reuses) a variant, one run per seed (each model alone: on this
    CPU a vmapped population is slower than its members one after another);
    returns its summary (see ``summary.json``)."""
    workdir = run_dir(name, full)
    config = variant_config(name, data, full)
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary["config"] == json.loads(config.to_json_best_effort()):
            return summary
    logging.info("Training %s", name)
    records = []
    for seed in seeds(full):
        config.seed = seed
        records.append(trainer.train_and_evaluate(config, os.path.join(workdir, f"seed_{seed}")))
    config.seed = 0
    image_shape = (CANVAS, CANVAS, 1) if VARIANTS[name].data == "padded" else (28, 28, 1)
    size = VARIANTS[name].data if isinstance(VARIANTS[name].data, int) else len(data.train.labels)
    train_images, train_labels = data.train.images[:size], data.train.labels[:size]
    if VARIANTS[name].data == "padded":
        train_images = pad(train_images)
    summary = {
        "config": json.loads(config.to_json_best_effort()),
        "test_accuracy": [r["test_accuracy"] for r in records],
        "train_accuracy": [
            float(np.mean(classify(train_images) == train_labels))
            for classify in seed_classifiers(workdir)
        ],
        "train_images": size,
        "steps": records[0]["step"],
        "parameters": parameter_counts(config, image_shape),
        "receptive_field": layers.receptive_field(model_specs(config))[0],
        # Training alone, evaluation excluded: the mean over seeds of the epochs' seconds.
        "train_sec_per_model": float(
            np.mean(
                [
                    sum(r["epoch_sec"] for r in read_metrics(os.path.join(workdir, f"seed_{k}")))
                    for k in seeds(full)
                ]
            )
        ),  # fmt: skip
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def read_metrics(workdir: str) -> list[dict]:
    with open(workdir_lib.path(workdir, workdir_lib.METRICS)) as f:
        return [json.loads(line) for line in f]


def seed_classifiers(workdir: str) -> list:
    """One ``images -> predicted labels`` function per seed of a trained variant."""
    classifiers = []
    for seed_dir in sorted(d for d in os.listdir(workdir) if d.startswith("seed_")):
        seed_dir = os.path.join(workdir, seed_dir)
        run = workdir_lib.load_run(seed_dir)
        config, model, params = run.config, run.model, run.params

        def classify(images, params=params, model=model, config=config):
            if config["permute_pixels"]:
                images = transforms.permute_pixels(images)
            return evaluation.predict(model.apply, params, images)

        classifiers.append(classify)
    return classifiers


def sweep_accuracy(name: str, data: input_pipeline.Dataset) -> dict[str, list[list[float]]]:
    """Per seed, test accuracy on all test images shifted by ``SHIFTS`` (the mean
    over up, down, left, right; zero fill) and rotated by ``ROTATIONS`` (the
    mean over both directions), cached in the run's ``sweeps.json``."""
    workdir = run_dir(name)
    path = os.path.join(workdir, "sweeps.json")
    if os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(
        os.path.join(workdir, "summary.json")
    ):
        with open(path) as f:
            return json.load(f)
    images, labels = data.test_images, data.test_labels
    if VARIANTS[name].data == "padded":
        images = pad(images)
    classifiers = seed_classifiers(workdir)

    def accuracy(transformed):  # Per seed.
        return [float(np.mean(classify(transformed) == labels)) for classify in classifiers]

    directions = ((1, 0), (-1, 0), (0, 1), (0, -1))
    sweeps = {
        "shift": [
            np.mean([accuracy(transforms.shift(images, s * dy, s * dx)) for dy, dx in directions],
                    axis=0).tolist()
            for s in SHIFTS
        ],
        "rotation": [
            np.mean([accuracy(transforms.rotate(images, a)) for a in {angle, -angle}],
                    axis=0).tolist()
            for angle in ROTATIONS
        ],
    }  # fmt: skip
    with open(path, "w") as f:
        json.dump(sweeps, f)
    return sweeps


def test_correct(name: str, data: input_pipeline.Dataset) -> np.ndarray:
    """Bool ``(seeds, test images)``: which test images each seed's model gets right;
    cached in the run's ``correct.npy``, the input of the paired comparisons."""
    workdir = run_dir(name)
    path = os.path.join(workdir, "correct.npy")
    if os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(
        os.path.join(workdir, "summary.json")
    ):
        return np.load(path)
    images = pad(data.test_images) if VARIANTS[name].data == "padded" else data.test_images
    correct = np.stack(
        [classify(images) == data.test_labels for classify in seed_classifiers(workdir)]
    )
    np.save(path, correct)
    return correct


def comparisons_table(data: input_pipeline.Dataset, summaries: dict) -> None:
    """Each pair of ``COMPARISONS`` on the same test images: the accuracy difference with
    its two-level paired bootstrap interval (seeds and images), and the verdict."""
    rows = []
    for a, b in COMPARISONS:
        if a not in summaries or b not in summaries:
            continue
        correct_a, correct_b = test_correct(a, data), test_correct(b, data)
        interval = flatten_stats.difference(correct_a, correct_b)
        p = flatten_stats.mcnemar(correct_a[0], correct_b[0])
        verdict = "different" if interval.excludes_zero() else "not shown to differ"
        rows.append([a, b, interval.text(), f"{p:.2g}", verdict])
    note = (
        "Difference: test accuracy of the first minus the second, in points, with its 95% "
        "interval from a two-level paired bootstrap (2,000 rounds: the test images resampled "
        "together for both, each variant's seeds on their own). The rule: two variants differ "
        "when that interval excludes 0. McNemar: the exact test of the two seed-0 models on "
        f"the same images. {budget()}"
    )
    header = ["variant A", "variant B", "A - B, points [95% CI]", "McNemar p (seed 0)", "verdict"]
    write_table("comparisons", header, rows, note)


def mean_std(values, scale: float = 100) -> str:
    values = scale * np.asarray(values)
    return f"{values.mean():.2f} +- {values.std(ddof=1) if len(values) > 1 else 0:.2f}"


TITLES = {
    "accuracy": "Accuracy of every variant",
    "invariance": "Shifts and rotations",
    "shift_controls": "Shift controls: a padded canvas, shift augmentation",
    "data_efficiency": "Accuracy against the training-set size",
    "full_budget": "The full budget: 10 epochs",
    "comparisons": "Paired comparisons on the shared test set",
}


def write_table(name: str, header: list[str], rows: list[list[str]], note: str) -> None:
    """``NAME.md`` in ``--out``: a title (the documentation site needs one), the table, a note."""
    lines = [f"# {TITLES[name]}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + f"\n\n{note}\n"
    with open(os.path.join(_OUT.value, f"{name}.md"), "w") as f:
        f.write(text)
    print(f"\n## {name}\n\n{text}")


def budget(full: bool = False) -> str:
    if full:
        return "Budget: 1 model (seed 0), 10 epochs of 60,000 images (4,690 steps of 128)."
    n = _TRAIN_IMAGES.value
    steps = -(-_EPOCHS.value * n // 128)
    return (
        f"Budget, the same for every variant: {_SEEDS.value} seeds (mean +- std), "
        f"{_EPOCHS.value} epoch(s) of {n:,} training images ({steps} steps of batch 128; a "
        f"smaller set is repeated to {n:,}), Adam 2e-3 with warmup + cosine decay "
        f"(configs/default.py). Accuracies over all {_TEST_IMAGES.value or 10_000:,} test images."
    )


def accuracy_table(summaries: dict) -> None:
    rows = []
    for name in [n for n in VARIANTS if n in summaries and not isinstance(VARIANTS[n].data, int)]:
        s = summaries[name]
        p = s["parameters"]
        gap = 100 * (np.asarray(s["train_accuracy"]) - np.asarray(s["test_accuracy"]))
        rows.append([
            name, f"{p['total']:,}", f"{p['first_dense']:,}", f"{p['head']:,}",
            f"{s['receptive_field']} px", mean_std(s["test_accuracy"]),
            mean_std(s["train_accuracy"]), f"{gap.mean():.2f}",
            f"{s['train_sec_per_model']:.0f}",
        ])  # fmt: skip
    header = [
        "variant", "parameters", "first dense layer", "head (all dense)", "receptive field",
        "test accuracy %", "train accuracy %", "train - test", "train s per model",
    ]  # fmt: skip
    note = (
        "Receptive field: the input pixels one unit of the last map before the flatten or "
        "global pool sees (layers.receptive_field). Train accuracy: the final models on "
        f"all their training images. {budget()}"
    )
    write_table("accuracy", header, rows, note)
    figures.dot_plot(
        os.path.join(_OUT.value, "accuracy.png"),
        {name: summaries[name]["test_accuracy"] for name in MAIN if name in summaries},
        "Test accuracy of every variant (same budget)",
        COLORS,
    )


def invariance_tables(sweeps: dict) -> None:
    for name_, names, note in (
        ("invariance", INVARIANCE, "Models trained on unshifted, unrotated 28x28 images."),
        ("shift_controls", CONTROLS,
         f"Padded canvas: trained and tested on images centred on a {CANVAS}x{CANVAS} canvas, "
         "so a shift of up to 4 pixels crops nothing. Shift-augmented: trained on 28x28 "
         "images each moved by a random shift of up to 4 pixels (config.augment_shift=4)."),
    ):  # fmt: skip
        names = [n for n in names if n in sweeps]
        header = ["model", *(f"shift {s}" for s in SHIFTS), *(f"rot {a}" for a in ROTATIONS)]
        rows = [
            [name, *(mean_std(a) for a in sweeps[name]["shift"]),
             *(mean_std(a) for a in sweeps[name]["rotation"])]
            for name in names
        ]  # fmt: skip
        sweep_note = (
            "Test accuracy (%) under shifts of s pixels (the mean over up, down, left and "
            "right; zero fill) and rotations about the centre (bilinear; the mean over both "
            f"directions). {note} {budget()}"
        )
        write_table(name_, header, rows, sweep_note)
        figures.sweeps(
            os.path.join(_OUT.value, f"{name_}.png"), {n: sweeps[n] for n in names}, SHIFTS,
            ROTATIONS, COLORS, shifts_only=name_ == "shift_controls",
        )  # fmt: skip


def efficiency_table(summaries: dict) -> None:
    rows, curves = [], {}
    for model in [m for m in EFFICIENCY if m in summaries]:
        for size in sizes():
            s = summaries[efficiency_name(model, size)]
            gap = 100 * (np.asarray(s["train_accuracy"]) - np.asarray(s["test_accuracy"]))
            rows.append([
                model, f"{size:,}", mean_std(s["train_accuracy"]), mean_std(s["test_accuracy"]),
                mean_std(gap, scale=1),
            ])  # fmt: skip
            curves.setdefault(model, []).append((size, s["train_accuracy"], s["test_accuracy"]))
    note = (
        "Train accuracy: the final models on their own N distinct training images. "
        f"Each size trains for the same number of steps. {budget()}"
    )
    header = ["model", "training images", "train accuracy %", "test accuracy %", "train - test"]
    write_table("data_efficiency", header, rows, note)
    figures.data_efficiency(os.path.join(_OUT.value, "data_efficiency.png"), curves, COLORS)


def full_budget_table(data) -> None:
    rows = []
    for name in [n for n in selected() if n in MAIN]:
        s = train_variant(name, data, full=True)
        (test,), (train,) = s["test_accuracy"], s["train_accuracy"]  # One seed.
        rows.append([name, f"{100 * test:.2f}", f"{100 * train:.2f}",
                     f"{s['train_sec_per_model']:.0f}"])  # fmt: skip
    header = ["variant", "test accuracy %", "train accuracy %", "train s"]
    write_table("full_budget", header, rows, budget(full=True))


def main(_):
    os.makedirs(_OUT.value, exist_ok=True)
    data = fashion()
    if _FULL.value:
        full_budget_table(data)
        return
    summaries = {name: train_variant(name, data) for name in selected()}
    accuracy_table(summaries)
    comparisons_table(data, summaries)
    efficiency_table(summaries)
    swept = [n for n in dict.fromkeys(INVARIANCE + CONTROLS) if n in summaries]
    invariance_tables({name: sweep_accuracy(name, data) for name in swept})
    if "CNN" in summaries and "GAP CNN" in summaries:
        flatten_equivariance.write(_OUT.value, data, lambda n: os.path.join(run_dir(n), "seed_0"))
    if "CNN" in summaries:
        cnn = os.path.join(run_dir("CNN"), "seed_0")
        explain.explain(cnn, output=os.path.join(_OUT.value, "explain.png"))


if __name__ == "__main__":
    app.run(main)
