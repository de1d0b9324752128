"""The experiments behind docs/flatten.md (third edition), every table and figure.

    python -m benchmarks.flatten_experiments --out docs/flatten
    python -m benchmarks.flatten_experiments --out /tmp/flatten --quick

The budget is the same for every variant: ``--num_epochs`` (1) epoch of 60,000
training images (469 steps of batch 128) with ``configs/default.py``'s Adam and
warmup + cosine schedule, at the learning rate chosen for the variant on a
validation split (``runs``). Each variant trains ``--seeds`` (5) models;
then the variants of each compared pair (``COMPARISONS``) whose mean accuracies are
less than ``CLOSE`` apart get ``--more_seeds`` (10). Tables give means with 95%
intervals, and ``comparisons.md`` tests the differences the write-up claims
(``stats``).

Writes, to ``--out``: ``learning_rates.md``, ``accuracy.md``, ``comparisons.md``,
``data_efficiency.md``, ``shifts.md`` and ``shift_controls.md`` (every shift of 0-8
pixels in x, y and diagonally), ``deformations.md`` (rotation, shear, scale,
elastic), ``equivariance.md``, ``receptive_fields.md``, their figures and ``explain.png``.
Each table ends with the command that rebuilds it and the compute it took. Trained
runs are kept in ``--out/runs*`` and reused (each seed is measured as it finishes
training, so a table needs only the runs' small files, not their models); a kept run
with another config stops the suite with an error naming it, so another budget (e.g.
``--num_epochs 10``) belongs in another ``--out``. ``--variant`` (repeatable),
``--train_images`` and ``--test_images`` run a smaller part of it; ``--quick`` is the
smallest (CI runs it).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
from absl import app, flags

from benchmarks.flatten_experiments import (
    equivariance,
    figures,
    measures,
    receptive,
    runs,
    stats,
    sweeps,
)
from benchmarks.flatten_experiments.sweeps import DIRECTIONS, SHIFTS, SWEEPS, is_clean
from cnnflat_jax.data import input_pipeline
from cnnflat_jax.tools import explain

_OUT = flags.DEFINE_string("out", "docs/flatten", "Where tables, figures and runs go.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Models per variant (seeds 0, 1, ...).")
_MORE_SEEDS = flags.DEFINE_integer(
    "more_seeds", 10, "Models per variant in a compared pair less than CLOSE apart."
)
_EPOCHS = flags.DEFINE_integer("num_epochs", 1, "Epochs of the training set per model.")
_VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "Repeatable: train only these and their smaller-set runs (default: all)."
)
_TRAIN_IMAGES = flags.DEFINE_integer("train_images", 60_000, "The first N training images.")
_TEST_IMAGES = flags.DEFINE_integer("test_images", 0, "The first N test images (0 = all).")
_WORKERS = flags.DEFINE_integer(
    "workers", len(os.sched_getaffinity(0)), "Models training at once, one CPU core each."
)
_QUICK = flags.DEFINE_boolean(
    "quick", False,
    "A smoke test of every table and figure in about a minute: the CNN, GAP CNN and "
    "deeper GAP CNN, a grid of 2 learning rates, 2 seeds, 600 training and 100 test images.",
)  # fmt: skip
QUICK_VARIANTS = ("CNN", "GAP CNN", "GAP CNN, deeper")

INVARIANCE = ("CNN", "CNN, avg pool", "CNN, anti-aliased max pool", "CNN, no pool (stride-2 convs)",
              "CNN, no downsampling", "CNN, no downsampling, dilated", "GAP CNN",
              "GMP CNN (global max pool)", "GAP CNN, deeper", "MLP")  # fmt: skip
CONTROLS = ("CNN", "GAP CNN", "MLP", "CNN, padded canvas", "GAP CNN, padded canvas",
            "MLP, padded canvas", "CNN, shift-augmented")  # fmt: skip
EQUIVARIANCE = ("CNN", "GAP CNN")
# The pairs the write-up compares, each tested on the same test images.
COMPARISONS = (
    ("CNN", "MLP"),
    ("CNN", "GAP CNN"),
    ("GAP CNN, deeper", "GAP CNN"),
    ("GMP CNN (global max pool)", "GAP CNN"),
    ("CNN", "GAP CNN, deeper"),
    ("CNN", "CNN, avg pool"),
    ("CNN, anti-aliased max pool", "CNN"),
    ("CNN", "CNN, no pool (stride-2 convs)"),
    ("CNN", "CNN, max pool 3"),
    ("CNN, max pool 3", "CNN, avg pool 3"),
    ("CNN", "CNN, no downsampling"),
    ("CNN", "CNN, no downsampling, dilated"),
    ("CNN, no downsampling", "CNN, no downsampling, dilated"),
    ("CNN", "CNN, no ReLU"),
    ("CNN", "CNN, permuted flatten"),
    ("CNN", "CNN, shuffled pixels"),
    ("CNN, shuffled pixels", "MLP"),
    ("MLP", "MLP, shuffled pixels"),
    ("CNN, shift-augmented", "CNN"),
    ("CNN, padded canvas", "CNN"),
    ("GAP CNN, padded canvas", "GAP CNN"),
)
CLOSE = 0.01  # Accuracy: a compared pair closer than a point gets more seeds.
COLORS = figures.palette(runs.MAIN)  # A variant keeps its colour in every figure.
TITLES = {
    "learning_rates": "The learning rate of each variant, chosen on a validation split",
    "accuracy": "Accuracy of every variant",
    "comparisons": "Paired comparisons on the shared test set",
    "data_efficiency": "Accuracy against the training-set size",
    "shifts": "Shifts of 0-8 pixels in x, y and diagonally",
    "shift_controls": "Shift controls: a padded canvas, shift augmentation",
    "deformations": "Rotation, shear, scale and elastic deformation",
    "receptive_fields": "Effective receptive fields",
}


def plan() -> runs.Plan:
    if _QUICK.value:
        return runs.Plan(
            _OUT.value,
            seeds=2,
            more_seeds=2,
            train_images=600,
            test_images=100,
            workers=_WORKERS.value,
            learning_rates=(2e-3, 4e-3),
            rate_range=(2e-3, 4e-3),
        )
    return runs.Plan(
        _OUT.value, _SEEDS.value, _MORE_SEEDS.value, _EPOCHS.value, _TRAIN_IMAGES.value,
        _TEST_IMAGES.value, _WORKERS.value,
    )  # fmt: skip


def sizes(p: runs.Plan) -> list[int]:
    return [n for n in runs.SMALLER if n < p.train_images] + [p.train_images]


def efficiency_name(model: str, size: int, p: runs.Plan) -> str:
    return model if size == p.train_images else f"{model}, {size} images"


def selected(p: runs.Plan) -> list[str]:
    """The variants to train: ``--variant``s (default all) and their smaller-set runs."""
    chosen = list(QUICK_VARIANTS) if _QUICK.value else (_VARIANTS.value or runs.MAIN)
    unknown = sorted(set(chosen) - set(runs.VARIANTS))
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; choose from {sorted(runs.VARIANTS)}")
    smaller = [efficiency_name(m, n, p) for m in runs.EFFICIENCY if m in chosen
               for n in sizes(p)[:-1]]  # fmt: skip
    return [n for n in runs.VARIANTS if n in chosen or n in smaller]


def reproduce(names, seconds: float, extra: str = "") -> str:
    """The command that rebuilds a table from scratch, and the compute it took."""
    bases = dict.fromkeys(runs.base_variant(n) for n in names)
    chosen = [] if set(runs.MAIN) <= set(bases) else bases  # All: the default.
    flags_ = [*(f'--variant "{n}"' for n in chosen), *([extra] if extra else [])]
    command = " ".join(["python -m benchmarks.flatten_experiments", *flags_])
    return (
        f"Reproduce: `{command}` (with the runs kept in "
        f"`{_OUT.value}`, it only rebuilds the tables). Measured for this table: "
        f"{seconds / 60:.1f} minutes of compute (the sum over its runs; training and the "
        "sweeps run one model per core, two at a time on the 2-core machine)."
    )


def budget(p: runs.Plan) -> str:
    steps = -(-p.epochs * p.train_images // 128)
    return (
        f"Budget, the same for every variant: {p.epochs} epoch(s) of {p.train_images:,} "
        f"training images ({steps} steps of batch 128; a smaller set is repeated to "
        f"{p.train_images:,}), Adam with warmup + cosine decay (configs/default.py) at the "
        f"variant's learning rate (learning_rates.md); {p.seeds} seeds per variant, "
        f"{p.more_seeds} for each variant of a compared pair less than {100 * CLOSE:.0f} "
        "point apart (the seeds column of accuracy.md). Accuracies over all "
        f"{p.test_images or 10_000:,} test images; [95% CI]: Student's t over the seeds."
    )


def interval(values, scale: float = 100) -> str:
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return f"{scale * values.mean():.2f}"
    return stats.mean_interval(values).text(scale)


def write_table(name: str, header: list[str], rows: list[list[str]], note: str) -> None:
    """``NAME.md`` in ``--out``: a title (the documentation site needs one), the table, a note."""
    lines = [f"# {TITLES[name]}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + f"\n\n{note}\n"
    with open(os.path.join(_OUT.value, f"{name}.md"), "w") as f:
        f.write(text)
    print(f"\n## {name}\n\n{text}")


def close_variants(accuracies: dict[str, list[float]]) -> frozenset:
    """The variants of the compared pairs whose mean test accuracies over the first
    ``--seeds`` seeds differ by less than CLOSE."""
    mean = {name: np.mean(values) for name, values in accuracies.items()}
    return frozenset(
        name
        for a, b in COMPARISONS
        if a in mean and b in mean and abs(mean[a] - mean[b]) < CLOSE
        for name in (a, b)
    )


def learning_rate_table(choices: dict, p: runs.Plan) -> None:
    tuned = {runs.base_variant(n): c for n, c in choices.items()}
    rates = sorted({rate for c in tuned.values() for rate in c["validation_accuracy"]})
    rows = [
        [name, *(f"{100 * c['validation_accuracy'][r]:.2f}" if r in c["validation_accuracy"]
                 else "" for r in rates), f"{c['learning_rate']:g}"]
        for name, c in tuned.items()
    ]  # fmt: skip
    note = (
        f"Validation accuracy (%) of seed 0 trained on the first {p.train_images * 5 // 6:,} "
        f"training images, validated on the last {p.train_images // 6:,} "
        "(config.validation_examples); the test set is not used. The grid is Adam's peak "
        f"rate {', '.join(f'{r:g}' for r in p.learning_rates)}, halved while the best rate "
        f"is the grid's bottom (down to {p.rate_range[0]:g}) and doubled while it is the "
        f"top (up to {p.rate_range[1]:g}); 0: the loss diverged. The best "
        "is chosen and the variant's seeds train with it on all training images. A variant "
        "with a smaller training set uses its full-set variant's rate. "
        + reproduce(tuned, sum(c["sec"] for c in tuned.values()))
    )
    header = ["variant", *(f"lr {r:g}" for r in rates), "chosen"]
    write_table("learning_rates", header, rows, note)


def accuracy_table(summaries: dict, choices: dict, p: runs.Plan) -> None:
    rows, names = [], [n for n in runs.MAIN if n in summaries]
    for name in names:
        s = summaries[name]
        gap = np.asarray(s["train_accuracy"]) - np.asarray(s["test_accuracy"])
        rows.append([
            name, f"{s['parameters']['total']:,}", f"{s['parameters']['first_dense']:,}",
            f"{s['receptive_field']} px", f"{s['learning_rate']:g}",
            str(len(s["test_accuracy"])), interval(s["test_accuracy"]),
            interval(s["train_accuracy"]), interval(gap), f"{s['train_sec_per_model']:.0f}",
        ])  # fmt: skip
    header = [
        "variant", "parameters", "first dense layer", "receptive field", "learning rate",
        "seeds", "test accuracy % [95% CI]", "train accuracy %", "train - test, points",
        "train s per model (1 core)",
    ]  # fmt: skip
    seconds = sum(summaries[n]["run_sec"] + choices[n]["sec"] for n in names)
    note = (
        "Receptive field: the input pixels one unit of the last map before the flatten or "
        "global pool sees (layers.receptive_field). Train accuracy: the final models on "
        f"all their training images. {budget(p)} {reproduce(names, seconds)} The minutes "
        "include the learning-rate grid's runs."
    )
    write_table("accuracy", header, rows, note)
    figures.dot_plot(
        os.path.join(_OUT.value, "accuracy.png"),
        {name: summaries[name]["test_accuracy"] for name in names},
        "Test accuracy of every variant (same budget, tuned learning rates)",
        COLORS,
    )


def measure(p: runs.Plan, name: str, seed: int):
    """What measures seed ``seed`` of variant ``name`` once trained: the sweeps of a swept
    variant's first ``p.seeds`` seeds, the equivariance of the CNN's and the GAP CNN's,
    the effective receptive field of ``receptive.MODELS``' seeds."""
    first = seed < p.seeds
    return functools.partial(
        measures.measure_seed, name=name, part=(p.train_images, p.test_images),
        sweep=first and name in INVARIANCE + CONTROLS,
        equivariance=first and name in EQUIVARIANCE, field=name in receptive.MODELS,
    )  # fmt: skip


def test_correct(name: str, data: input_pipeline.Dataset, p: runs.Plan) -> np.ndarray:
    """Bool ``(seeds, test images)``: which test images each seed's model gets right, the
    input of the paired comparisons."""
    images = len(data.test_labels)
    return np.stack([measures.test_right(m, images) for m in runs.seed_measures(p, name)])


def comparisons_table(data, summaries: dict, p: runs.Plan) -> None:
    """Each pair of ``COMPARISONS`` on the same test images: the accuracy difference with
    its two-level paired bootstrap interval (seeds and images), and the verdict."""
    rows = []
    for a, b in COMPARISONS:
        if a not in summaries or b not in summaries:
            continue
        correct_a, correct_b = test_correct(a, data, p), test_correct(b, data, p)
        difference = stats.difference(correct_a, correct_b)
        p_value = stats.mcnemar(correct_a[0], correct_b[0])
        verdict = "different" if difference.excludes_zero() else "not shown to differ"
        rows.append([a, b, f"{len(correct_a)} / {len(correct_b)}", difference.text(),
                     f"{p_value:.2g}", verdict])  # fmt: skip
    note = (
        "Difference: test accuracy of the first minus the second, in points, with its 95% "
        "interval from a two-level paired bootstrap (2,000 rounds: the test images resampled "
        "together for both, each variant's seeds on their own), so it covers both the seeds' "
        "and the test set's sampling noise. The rule: two variants differ when that interval "
        "excludes 0. McNemar: the exact test of the two seed-0 models on the same images. "
        f"{budget(p)}"
    )
    header = ["variant A", "variant B", "seeds", "A - B, points [95% CI]", "McNemar p (seed 0)",
              "verdict"]  # fmt: skip
    write_table("comparisons", header, rows, note)


def efficiency_table(summaries: dict, choices: dict, p: runs.Plan) -> None:
    rows, curves, names = [], {}, []
    for model in [m for m in runs.EFFICIENCY if m in summaries]:
        for size in sizes(p):
            names.append(efficiency_name(model, size, p))
            s = summaries[names[-1]]
            gap = np.asarray(s["train_accuracy"]) - np.asarray(s["test_accuracy"])
            rows.append([model, f"{size:,}", interval(s["train_accuracy"]),
                         interval(s["test_accuracy"]), interval(gap)])  # fmt: skip
            curves.setdefault(model, []).append((size, s["train_accuracy"], s["test_accuracy"]))
    seconds = sum(summaries[n]["run_sec"] for n in names) + sum(choices[m]["sec"] for m in curves)
    note = (
        "Train accuracy: the final models on their own N distinct training images. "
        f"Each size trains for the same number of steps. {budget(p)} {reproduce(names, seconds)} "
        "The minutes include the full-set variants' learning-rate grids."
    )
    header = ["model", "training images", "train accuracy %", "test accuracy % [95% CI]",
              "train - test, points"]  # fmt: skip
    write_table("data_efficiency", header, rows, note)
    figures.data_efficiency(os.path.join(_OUT.value, "data_efficiency.png"), curves, COLORS)


def rises(swept: dict, names) -> str:
    """The signature of aliasing: where a model's accuracy rises from one shift to the
    next, by its seeds' paired differences (Student's t), whose interval excludes 0."""
    found = []
    for name in names:
        for direction in DIRECTIONS:
            accuracy = np.asarray(swept[name][f"shift {direction}"], dtype=np.float64)
            if accuracy.shape[1] < 2:
                continue  # One seed: no interval.
            for s in range(len(SHIFTS) - 1):
                rise = stats.mean_interval(accuracy[s + 1] - accuracy[s])
                if rise.low > 0:
                    found.append(f"{name}, {direction}, {SHIFTS[s]} -> {SHIFTS[s + 1]} px: "
                                 f"+{rise.text()}")  # fmt: skip
    return (
        "Rises from one shift to the next within a model (points: the seeds' paired "
        "differences, Student's t; listed where the 95% interval excludes 0): "
        f"{'; '.join(found) or 'none'}."
    )


def sweep_tables(swept: dict, p: runs.Plan) -> None:
    canvas = (
        f"Padded canvas: trained and tested on images centred on a {runs.CANVAS}x{runs.CANVAS} "
        "canvas, so a shift of up to 4 pixels crops nothing. Shift-augmented: trained on "
        "28x28 images each moved by a random shift of up to 4 pixels (config.augment_shift=4)."
    )
    for table, names, extra in (("shifts", INVARIANCE, ""), ("shift_controls", CONTROLS, canvas)):
        names = [n for n in names if n in swept]
        rows = [[name, direction, *(interval(a) for a in swept[name][f"shift {direction}"])]
                for name in names for direction in DIRECTIONS]  # fmt: skip
        seconds = sum(swept[n]["sec"] for n in names)
        note = (
            f"Test accuracy (%) [95% CI over each variant's first {p.seeds} seeds] of the test "
            "images moved s pixels right "
            "(x), down (y) or both (diagonal), zero fill. The CNN's pools have a total stride "
            f"of 4: a shift by a multiple of 4 moves its last maps by whole cells. {extra} "
            f"{rises(swept, names)} "
            f"{budget(p)} {reproduce(names, seconds)} The minutes are the sweeps' only (the "
            "training is in accuracy.md)."
        )
        header = ["model", "direction", *(f"{s} px" for s in SHIFTS)]
        write_table(table, header, rows, note)
        panels = [(f"shift {d}", f"shift {d}, pixels", SHIFTS) for d in DIRECTIONS]
        figures.sweeps(os.path.join(_OUT.value, f"{table}.png"), {n: swept[n] for n in names},
                       panels, COLORS, marks=(4, 8))  # fmt: skip
    names = [n for n in INVARIANCE if n in swept]
    levels = {sweep: levels for sweep, (levels, _) in SWEEPS.items() if "shift" not in sweep}
    header = ["model", *(f"{sweep} {level:g}" for sweep, ls in levels.items() for level in ls
                         if not is_clean(sweep, level))]  # fmt: skip
    rows = [
        [name, *(interval(a) for sweep, ls in levels.items()
                 for level, a in zip(ls, swept[name][sweep]) if not is_clean(sweep, level))]
        for name in names
    ]  # fmt: skip
    note = (
        f"Test accuracy (%) [95% CI over each variant's first {p.seeds} seeds] under rotation "
        "(degrees about the centre, "
        "the mean of both directions), horizontal shear (columns per row from the centre, "
        "both directions), scale (zoom about the centre) and elastic deformation (Simard et "
        "al. 2003: a random displacement field smoothed by a Gaussian of std 4 px, scaled to "
        "the given root-mean-square pixels; one field per test image, the same for every "
        f"model); bilinear, zero fill. The clean accuracy is in shifts.md at 0 px. {budget(p)} "
        + reproduce(names, sum(swept[n]["sec"] for n in names))
        + " The minutes are the sweeps' only (the training is in accuracy.md)."
    )
    write_table("deformations", header, rows, note)
    labels = {"rotation": "rotation, degrees", "shear": "shear, columns per row",
              "scale": "scale factor", "elastic": "elastic, root-mean-square pixels"}  # fmt: skip
    panels = [(sweep, labels[sweep], ls) for sweep, ls in levels.items()]
    figures.sweeps(os.path.join(_OUT.value, "deformations.png"), {n: swept[n] for n in names},
                   panels, COLORS)  # fmt: skip


def receptive_table(names, summaries: dict, p: runs.Plan) -> None:
    measured = {}
    for name in names:
        seeds = runs.seed_measures(p, name)
        fields = [np.asarray(m["field"]) for m in seeds]
        measured[name] = {
            "fields": fields,
            "theoretical": summaries[name]["receptive_field"],
            "side_90": [receptive.mass_side(f) for f in fields],
            "sec": sum(m["field_sec"] for m in seeds),
        }
    rows = [[name, str(len(m["fields"])), f"{m['theoretical']} px",
             interval(m["side_90"], scale=1)] for name, m in measured.items()]  # fmt: skip
    note = (
        "Effective receptive field (Luo et al. 2016): the magnitude of the gradient of the "
        "centre unit of the last map before the flatten or global pool (summed over its "
        "channels) with respect to each input pixel, averaged over the first "
        f"{receptive.IMAGES:,} test images; the side of the smallest square around "
        "its centre of mass that holds 90% of it, per seed [95% CI over the seeds]. "
        "Theoretical: the pixels a unit of that map can see (layers.receptive_field). "
        + reproduce(measured, sum(m["sec"] for m in measured.values()))
        + " The minutes are the gradients' only (the training is in accuracy.md)."
    )
    header = ["model", "seeds", "theoretical receptive field", "side holding 90% of the "
              "gradient, px [95% CI]"]  # fmt: skip
    write_table("receptive_fields", header, rows, note)
    receptive.figure(os.path.join(_OUT.value, "receptive_fields.png"), measured)


def main(_):
    p = plan()
    os.makedirs(p.out, exist_ok=True)
    data = runs.fashion(p)
    names = selected(p)
    choices = runs.choose_learning_rates(names, data, p)
    learning_rate_table(choices, p)
    full_sets = [n for n in names if n in runs.MAIN]  # The smaller training sets train last.
    first = runs.test_accuracies(full_sets, data, p, choices, functools.partial(measure, p))
    p = dataclasses.replace(p, more=close_variants(first))
    measured = functools.partial(measure, p)
    summaries = runs.train_variants(full_sets, data, p, choices, measured)
    accuracy_table(summaries, choices, p)
    comparisons_table(data, summaries, p)
    sweep_tables(sweeps.swept([n for n in dict.fromkeys(INVARIANCE + CONTROLS)
                               if n in summaries], p), p)  # fmt: skip
    runs.keep_params([n for n in EQUIVARIANCE if n in summaries], data, p, choices, measured)
    if all(n in summaries for n in EQUIVARIANCE):
        equivariance.write(
            _OUT.value, data,
            {n: {"seeds": [m["equivariance"] for m in runs.seed_measures(p, n, p.seeds)],
                 "sec": sum(m["equivariance_sec"] for m in runs.seed_measures(p, n, p.seeds))}
             for n in EQUIVARIANCE},
            [runs.seed_dirs(p, n)[0] for n in EQUIVARIANCE],
            lambda seconds: reproduce(EQUIVARIANCE, seconds)
            + " The minutes are the measurement's and the figure's only (the training is in "
            "accuracy.md).",
        )  # fmt: skip
    fields = [n for n in receptive.MODELS if n in summaries]
    if fields:
        receptive_table(fields, summaries, p)
    if "CNN" in summaries:
        explain.explain(runs.seed_dirs(p, "CNN")[0], output=os.path.join(_OUT.value, "explain.png"))
    smaller = [n for n in names if n not in runs.MAIN]
    summaries |= runs.train_variants(smaller, data, p, choices, measured)
    efficiency_table(summaries, choices, p)
