"""The flatten write-up's figures: error bars, value labels, marked axes, chance lines."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

CHANCE = 10.0  # Ten classes.


def _mean_std(values) -> tuple[float, float]:
    values = 100 * np.asarray(values)
    return values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0


def dot_plot(path: str, accuracies: dict[str, list[float]], title: str) -> None:
    """Mean +- std per variant as a dot with an error bar and its value; the
    accuracy axis is zoomed, and says so."""
    names = list(accuracies)
    stats = [_mean_std(accuracies[n]) for n in names]
    fig = Figure(figsize=(9, 0.45 * len(names) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))
    ax.errorbar([m for m, _ in stats], y, xerr=[s for _, s in stats], fmt="o", capsize=4)
    for yi, (m, s) in zip(y, stats):
        ax.annotate(f"{m:.2f} ± {s:.2f}", (m + s, yi), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    low = np.floor(min(m - s for m, s in stats) - 1)
    high = np.ceil(max(m + s for m, s in stats) + 3)
    ax.set_xlim(low, high)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(
        f"test accuracy, % (mean ± std over seeds). Axis zoomed: {low:.0f} to {high:.0f}%"
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def sweeps(path, results, shifts, rotations, shifts_only: bool = False) -> None:
    """Accuracy under shifts (and rotations) with a chance line, and the drop from
    each model's clean accuracy."""
    panels = [("shift", shifts, "shift, pixels")]
    if not shifts_only:
        panels.append(("rotation", rotations, "rotation, degrees"))
    columns = len(panels)
    fig = Figure(figsize=(6 * columns, 8))
    for i, (key, sweep, label) in enumerate(panels):  # Accuracy above, its drop below.
        accuracy = fig.add_subplot(2, columns, i + 1)
        drop = fig.add_subplot(2, columns, columns + i + 1)
        for name, result in results.items():
            acc = 100 * np.asarray(result[key]).T  # (seeds, sweep)
            accuracy.errorbar(sweep, acc.mean(0), yerr=acc.std(0, ddof=1), marker="o",
                              capsize=3, label=name)  # fmt: skip
            lost = acc[:, :1] - acc
            drop.errorbar(sweep, lost.mean(0), yerr=lost.std(0, ddof=1), marker="o", capsize=3)
        accuracy.axhline(CHANCE, color="gray", linestyle=":", label="chance (10%)")
        accuracy.set_ylim(0, 100)
        accuracy.set_ylabel("test accuracy, %")
        accuracy.set_title(f"accuracy under {key}", fontsize=10)
        drop.set_ylim(0, None)
        drop.set_ylabel("points lost from the clean accuracy")
        drop.set_title(f"drop from the clean accuracy, {key}", fontsize=10)
        for ax in (accuracy, drop):
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        accuracy.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def data_efficiency(path, curves) -> None:
    """Train (dashed) and test (solid) accuracy against the training-set size, log x;
    and their gap."""
    fig = Figure(figsize=(11, 4.2))
    acc_ax, gap_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (model, points) in enumerate(curves.items()):
        color = f"C{i}"
        sizes = [n for n, _, _ in points]
        train = np.array([_mean_std(t) for _, t, _ in points])
        test = np.array([_mean_std(t) for _, _, t in points])
        acc_ax.errorbar(sizes, test[:, 0], yerr=test[:, 1], marker="o", capsize=3, color=color,
                        label=f"{model}: test")  # fmt: skip
        acc_ax.plot(sizes, train[:, 0], "--", marker=".", color=color, label=f"{model}: train")
        gaps = [100 * (np.asarray(t) - np.asarray(s)) for _, t, s in points]
        gap_ax.errorbar(sizes, [g.mean() for g in gaps], yerr=[g.std(ddof=1) for g in gaps],
                        marker="o", capsize=3, color=color, label=model)  # fmt: skip
    acc_ax.axhline(CHANCE, color="gray", linestyle=":", label="chance (10%)")
    acc_ax.set_ylim(0, 100)
    acc_ax.set_ylabel("accuracy, % (solid: test, dashed: train)")
    gap_ax.set_ylabel("train - test accuracy, points")
    gap_ax.set_ylim(0, None)
    for ax, title in ((acc_ax, "accuracy"), (gap_ax, "overfitting: the train-test gap")):
        ax.set_xscale("log")
        ax.set_xlabel("training images (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
