"""The flatten write-up's figures: one colour per variant in every figure, 95% intervals
over seeds (the count in each axis label), no clipped axis, no line hidden under another."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from benchmarks.flatten_experiments import stats

CHANCE = 10.0  # Ten classes.
MARKERS = "osD^vP*Xh<>p"


def palette(names) -> dict[str, tuple]:
    """A colour per variant name, in the order given: the same in every figure."""
    cmap = matplotlib.colormaps["tab20"]
    return {name: cmap(i % 20) for i, name in enumerate(names)}


def _mean_ci(values) -> tuple[float, float]:
    """Mean and the 95% interval's half-width, in percent; no interval for one seed."""
    values = 100 * np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    interval = stats.mean_interval(values)
    return interval.estimate, interval.high - interval.estimate


def _error_label(counts) -> str:
    """What the error bars are, for series of ``counts`` seeds each."""
    low, high = min(counts), max(counts)
    if low < high:
        return f"mean and 95% CI over {low}-{high} seeds"
    return f"mean and 95% CI over {low} seeds" if low > 1 else "1 seed, no interval"


def dot_plot(path: str, accuracies: dict[str, list[float]], title: str, colors: dict) -> None:
    """Mean and 95% interval per variant as a dot with an error bar and its value; the
    accuracy axis is zoomed, and says so."""
    names = list(accuracies)
    intervals = [_mean_ci(accuracies[n]) for n in names]
    fig = Figure(figsize=(9, 0.45 * len(names) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    for yi, (name, (m, half)) in enumerate(zip(names, intervals)):
        ax.errorbar(m, yi, xerr=half, fmt="o", capsize=4, color=colors[name])
        ax.annotate(f"{m:.2f} ± {half:.2f} (n = {len(accuracies[name])})", (m + half, yi),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    low = np.floor(min(m - h for m, h in intervals) - 1)
    high = np.ceil(max(m + h for m, h in intervals) + 3)
    ax.set_xlim(low, high)
    ax.set_yticks(np.arange(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    bars = _error_label([len(v) for v in accuracies.values()])
    ax.set_xlabel(f"test accuracy, % ({bars}). Axis zoomed: {low:.0f} to {high:.0f}%")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _dodged(sweep, i: int, count: int) -> np.ndarray:
    """The sweep's x values nudged apart per series, so equal curves stay visible."""
    step = np.min(np.diff(sweep)) if len(sweep) > 1 else 1.0
    return np.asarray(sweep, dtype=float) + step * 0.06 * (i - (count - 1) / 2)


def sweeps(path, results: dict, panels, colors: dict, marks=()) -> None:
    """One panel per ``(key, x label, levels)`` of ``panels``: each model's accuracy at each
    level of ``results[model][key]`` (levels x seeds), mean and 95% interval, with a chance
    line; ``marks``: x values to draw a dotted line at (the total stride's multiples)."""
    counts = [len(r[panels[0][0]][0]) for r in results.values()]
    columns = 2 if len(panels) == 4 else min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(5.5 * columns, 4.6 * rows))
    for i, (key, label, levels) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        for j, (name, result) in enumerate(results.items()):
            mean_ci = np.array([_mean_ci(seeds) for seeds in result[key]])
            ax.errorbar(_dodged(levels, j, len(results)), mean_ci[:, 0], yerr=mean_ci[:, 1],
                        label=name, marker=MARKERS[j % len(MARKERS)], capsize=3,
                        color=colors[name],
                        markerfacecolor="none" if j % 2 else colors[name])  # fmt: skip
        for x in marks:
            ax.axvline(x, color="gray", lw=0.8, ls=":")
        ax.axhline(CHANCE, color="gray", linestyle="--", lw=0.8, label="chance (10%)")
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"test accuracy, % ({_error_label(counts)})")
        ax.set_xlabel(f"{label} (series nudged apart so that none hides another)", fontsize=8)
        ax.set_title(f"accuracy under {key}", fontsize=10)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def data_efficiency(path, curves, colors: dict) -> None:
    """Train (dashed) and test (solid) accuracy against the training-set size, log x;
    and their gap. The accuracy axis is zoomed to the curves, and says so."""
    fig = Figure(figsize=(11, 4.2))
    acc_ax, gap_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    values = []
    counts = [len(t) for points in curves.values() for _, _, t in points]
    for model, points in curves.items():
        color = colors[model]
        sizes = [size for size, _, _ in points]
        train = np.array([_mean_ci(t) for _, t, _ in points])
        test = np.array([_mean_ci(t) for _, _, t in points])
        acc_ax.errorbar(sizes, test[:, 0], yerr=test[:, 1], marker="o", capsize=3, color=color,
                        label=f"{model}: test")  # fmt: skip
        acc_ax.plot(sizes, train[:, 0], "--", marker=".", color=color, label=f"{model}: train")
        gaps = np.array([_mean_ci(np.asarray(t) - np.asarray(s)) for _, t, s in points])
        gap_ax.errorbar(sizes, gaps[:, 0], yerr=gaps[:, 1], marker="o", capsize=3, color=color,
                        label=model)  # fmt: skip
        values += [*(test[:, 0] - test[:, 1]), *(test[:, 0] + test[:, 1]), *train[:, 0]]
    low, high = np.floor(min(values) - 1), min(100.0, np.ceil(max(values) + 1))
    acc_ax.set_ylim(low, high)
    acc_ax.set_ylabel(f"accuracy, % (axis zoomed: {low:.0f} to {high:.0f}; chance is 10)")
    gap_ax.axhline(0, color="gray", lw=0.8)
    gap_ax.set_ylabel("train - test accuracy, points")
    titles = {
        acc_ax: f"accuracy (solid: test, dashed: train; {_error_label(counts)})",
        gap_ax: f"overfitting: the train-test gap ({_error_label(counts)})",
    }
    for ax, title in titles.items():
        ax.set_xscale("log")
        sizes = sorted({size for points in curves.values() for size, _, _ in points})
        ax.set_xticks(sizes, [f"{size:,}" for size in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training images (log scale)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
