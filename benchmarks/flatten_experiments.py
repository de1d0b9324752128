"""Does flattening lose spatial structure? Why not flatten raw pixels? Measured.

    python -m benchmarks.flatten_experiments --out docs/flatten

Trains each variant below as a population of ``--seeds`` models (one per
seed: initialisation and data order) on real Fashion-MNIST, then writes a
markdown table (mean +- std over seeds) and a plot per experiment to
``--out``:

1. ``mlp_vs_cnn``: the CNN against an MLP that flattens raw pixels, at
   comparable parameter counts: test accuracy and training time.
2. ``invariance``: test accuracy under shifts (0..4 pixels, the mean over
   up/down/left/right) and rotations (0..30 degrees, the mean over both
   directions) for the CNN with max pooling, average pooling, no pooling
   (strided convs) and the MLP.
3. ``shuffled``: every image's pixels moved by one fixed permutation, for
   the CNN and the MLP; and the CNN with its flattened vector permuted
   before the dense layer.
4. ``pooling``: max against average pooling, windows 2 and 3.

Trained runs are kept in ``--out/runs/<variant>`` and reused when rerun.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure

from cnnflat_jax import checkpoints, input_pipeline, models, train_lib, trainer, transforms
from configs import default

_OUT = flags.DEFINE_string("out", "docs/flatten", "Where tables, plots and runs go.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Models per variant (seeds 0, 1, ...).")
_EPOCHS = flags.DEFINE_integer("num_epochs", 3, "Training epochs per model.")
_TRAIN = flags.DEFINE_integer("num_train", 0, "Training images (0 = all 60,000).")
_INVARIANCE_TEST = flags.DEFINE_integer(
    "invariance_test_images", 2000, "Test images for the shift/rotation sweeps."
)
_EXPERIMENTS = flags.DEFINE_list(
    "experiments", ["mlp_vs_cnn", "invariance", "shuffled", "pooling"], "Which to run."
)

SHIFTS = (0, 1, 2, 3, 4)
ROTATIONS = (0, 5, 10, 15, 20, 25, 30)
# Variant -> overrides of configs/default.py. The MLP's hidden layer gives it
# about the CNN's parameter count (813,066 vs 824,458).
VARIANTS = {
    "CNN, max pool 2": {},
    "CNN, avg pool 2": {"model.pool": "avg"},
    "CNN, no pool (stride-2 convs)": {"model.pool": "stride"},
    "CNN, max pool 3": {"model.pool_window": 3},
    "CNN, avg pool 3": {"model.pool": "avg", "model.pool_window": 3},
    "MLP on raw pixels": {"model": {"name": "mlp", "dense_features": (1024,)}},
    "CNN, shuffled pixels": {"permute_pixels": True},
    "MLP, shuffled pixels": {
        "permute_pixels": True,
        "model": {"name": "mlp", "dense_features": (1024,)},
    },
    "CNN, permuted flatten": {"model.permute_flat": True},
}
EXPERIMENT_VARIANTS = {
    "mlp_vs_cnn": ["CNN, max pool 2", "MLP on raw pixels"],
    "invariance": [
        "CNN, max pool 2",
        "CNN, avg pool 2",
        "CNN, no pool (stride-2 convs)",
        "MLP on raw pixels",
    ],
    "shuffled": [
        "CNN, max pool 2",
        "CNN, shuffled pixels",
        "MLP on raw pixels",
        "MLP, shuffled pixels",
        "CNN, permuted flatten",
    ],
    "pooling": ["CNN, max pool 2", "CNN, avg pool 2", "CNN, max pool 3", "CNN, avg pool 3"],
}


def variant_config(name: str):
    config = default.get_config()
    config.num_epochs = _EPOCHS.value
    config.warmup_epochs = min(config.warmup_epochs, _EPOCHS.value / 4)
    config.num_train_examples = _TRAIN.value
    config.progress_bar = False
    config.population.size = _SEEDS.value
    config.population.independent_data_order = True
    for key, value in VARIANTS[name].items():
        if key == "model":
            config.model = type(config.model)(value)
        elif key.startswith("model."):
            config.model[key.removeprefix("model.")] = value
        else:
            config[key] = value
    return config


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def train_variant(name: str) -> dict:
    """Trains (or reuses) a variant; returns its per-seed accuracies and seconds."""
    workdir = os.path.join(_OUT.value, "runs", slug(name))
    summary_path = os.path.join(workdir, "summary.json")
    config = variant_config(name)
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary["config"] == json.loads(config.to_json_best_effort()):
            return summary
    logging.info("Training %s (%d seeds, %d epochs)", name, _SEEDS.value, _EPOCHS.value)
    start = time.perf_counter()
    record = trainer.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_sec = sum(r["epoch_sec"] for r in records if r.get("member") == "ensemble")
    summary = {
        "config": json.loads(config.to_json_best_effort()),
        "test_accuracy": [m["test_accuracy"] for m in record["members"]],
        "parameters": parameter_count(config),
        # The population trains its members together: each model's share.
        "train_sec_per_model": train_sec / _SEEDS.value,
        "wall_sec": wall,
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def parameter_count(config) -> int:
    model = models.from_fields(config.model, 10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def mean_std(values) -> str:
    values = [100 * v for v in values]
    return (
        f"{statistics.mean(values):.2f} +- {statistics.stdev(values) if len(values) > 1 else 0:.2f}"
    )


def write(name: str, table: list[list[str]], fig: Figure, note: str) -> None:
    header, *rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    settings = (
        f"{_SEEDS.value} seeds, {_EPOCHS.value} epochs, "
        f"{_TRAIN.value or 60000} training images, batch 128, Adam (configs/default.py)"
    )
    text = "\n".join(lines) + f"\n\n{note}\n\nSettings: {settings}.\n"
    with open(os.path.join(_OUT.value, f"{name}.md"), "w") as f:
        f.write(text)
    fig.tight_layout()
    fig.savefig(os.path.join(_OUT.value, f"{name}.png"), dpi=100)
    print(f"\n## {name}\n\n{text}")


def bar_figure(labels, summaries, title) -> Figure:
    fig = Figure(figsize=(8, 0.6 * len(labels) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    accs = [100 * np.array(s["test_accuracy"]) for s in summaries]
    ax.barh(
        labels, [a.mean() for a in accs], xerr=[a.std(ddof=1) if len(a) > 1 else 0 for a in accs]
    )
    low = min(a.min() for a in accs)
    ax.set_xlim(max(0, low - 5), 100)
    ax.set_xlabel("test accuracy, % (mean, error bar: std over seeds)")
    ax.set_title(title)
    ax.invert_yaxis()
    return fig


def mlp_vs_cnn(summaries: dict) -> None:
    names = EXPERIMENT_VARIANTS["mlp_vs_cnn"]
    table = [["model", "parameters", "test accuracy %", "train s per model"]]
    for name in names:
        s = summaries[name]
        table.append([name, f"{s['parameters']:,}", mean_std(s["test_accuracy"]),
                      f"{s['train_sec_per_model']:.1f}"])  # fmt: skip
    fig = bar_figure(names, [summaries[n] for n in names], "CNN vs an MLP on raw pixels")
    write("mlp_vs_cnn", table, fig, "Same data, optimizer and epochs for both.")


def seed_classifiers(workdir: str) -> list:
    """One ``images -> predicted labels`` function per seed of a trained variant."""
    config = checkpoints.read_config(workdir)
    model = models.from_fields(config["model"], 10)
    classifiers = []
    for member in range(config["population"]["size"]):
        _, params = checkpoints.load_trained(
            workdir, input_hwc=(28, 28, 1), num_classes=10, member=member
        )

        def classify(images, params=params):
            if config["permute_pixels"]:
                images = transforms.permute_pixels(images)
            return train_lib.predict(model.apply, params, images)

        classifiers.append(classify)
    return classifiers


def invariance(summaries: dict, test_images, test_labels) -> None:
    names = EXPERIMENT_VARIANTS["invariance"]
    images = test_images[: _INVARIANCE_TEST.value]
    labels = test_labels[: _INVARIANCE_TEST.value]
    directions = ((1, 0), (-1, 0), (0, 1), (0, -1))
    results = {}
    for name in names:
        classifiers = seed_classifiers(os.path.join(_OUT.value, "runs", slug(name)))

        def accuracy(transform, classifiers=classifiers):  # Per seed.
            x = transform(images)
            return np.array([np.mean(classify(x) == labels) for classify in classifiers])

        shift_acc = [
            np.mean([accuracy(lambda x, s=s, d=d: transforms.shift(x, s * d[0], s * d[1]))
                     for d in directions], axis=0)
            for s in SHIFTS
        ]  # fmt: skip
        rotate_acc = [
            np.mean([accuracy(lambda x, a=a: transforms.rotate(x, a)) for a in {angle, -angle}],
                    axis=0)
            for angle in ROTATIONS
        ]  # fmt: skip
        results[name] = (np.array(shift_acc).T, np.array(rotate_acc).T)
    fig = Figure(figsize=(11, 4))
    for i, (sweep, label) in enumerate(
        ((SHIFTS, "shift, pixels"), (ROTATIONS, "rotation, degrees"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for name in names:
            acc = 100 * results[name][i]  # (seeds, sweep)
            ax.errorbar(sweep, acc.mean(axis=0), yerr=acc.std(axis=0, ddof=1), marker="o",
                        capsize=3, label=name)  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy, %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    table = [["model", *(f"shift {s}" for s in SHIFTS), *(f"rot {a}" for a in ROTATIONS)]]
    for name in names:
        shift_acc, rotate_acc = results[name]
        table.append(
            [name, *(mean_std(a) for a in shift_acc.T), *(mean_std(a) for a in rotate_acc.T)]
        )
    note = (
        f"Test accuracy (%) on the first {len(labels)} test images, shifted (zero fill; "
        "the mean over up, down, left, right) or rotated about the centre (bilinear; the "
        "mean over both directions). Models trained on unshifted, unrotated images."
    )
    write("invariance", table, fig, note)


def shuffled(summaries: dict) -> None:
    names = EXPERIMENT_VARIANTS["shuffled"]
    table = [["model", "test accuracy %"]] + [
        [n, mean_std(summaries[n]["test_accuracy"])] for n in names
    ]
    fig = bar_figure(names, [summaries[n] for n in names], "Shuffled pixels, permuted flatten")
    note = (
        "Shuffled pixels: one fixed permutation of the 784 pixel positions, the same for "
        "every training and test image. Permuted flatten: one fixed permutation of the "
        "3136-long flattened vector before the first dense layer."
    )
    write("shuffled", table, fig, note)


def pooling(summaries: dict) -> None:
    names = EXPERIMENT_VARIANTS["pooling"]
    table = [["model", "flatten size", "parameters", "test accuracy %"]]
    for name in names:
        s = summaries[name]
        window = s["config"]["model"]["pool_window"]
        side = 28 // window // window
        table.append([name, f"{side}x{side}x64 = {side * side * 64}", f"{s['parameters']:,}",
                      mean_std(s["test_accuracy"])])  # fmt: skip
    fig = bar_figure(names, [summaries[n] for n in names], "Max vs average pooling, window 2 vs 3")
    write("pooling", table, fig, "Window 3 also strides by 3: 28 -> 9 -> 3.")


def main(_):
    os.makedirs(_OUT.value, exist_ok=True)
    unknown = set(_EXPERIMENTS.value) - set(EXPERIMENT_VARIANTS)
    if unknown:
        raise app.UsageError(
            f"unknown experiments {sorted(unknown)}; choose from {sorted(EXPERIMENT_VARIANTS)}"
        )
    needed = dict.fromkeys(n for e in _EXPERIMENTS.value for n in EXPERIMENT_VARIANTS[e])
    summaries = {name: train_variant(name) for name in needed}
    for experiment in _EXPERIMENTS.value:
        if experiment == "invariance":
            data = input_pipeline.load_data(variant_config("CNN, max pool 2"), data_shards=1)
            invariance(summaries, data.test_images, data.test_labels)
        else:
            {"mlp_vs_cnn": mlp_vs_cnn, "shuffled": shuffled, "pooling": pooling}[experiment](
                summaries
            )


if __name__ == "__main__":
    app.run(main)
