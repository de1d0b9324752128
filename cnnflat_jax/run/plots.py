"""Figures written to the workdir (matplotlib's object API: no global state)."""

from __future__ import annotations

import io
import math
import os

import numpy as np
from matplotlib.figure import Figure

from cnnflat_jax.run import workdir as workdir_lib


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """The figure as a PNG at ``path``, whole or not at all, never through a link."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    workdir_lib.replace_file(path, png.getvalue())


def save_image_grid(
    path: str | os.PathLike, images: np.ndarray, titles: list[str], columns: int = 8
) -> None:
    """Saves uint8 NHWC ``images`` as a PNG grid, each with its title."""
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(1.6 * columns, 1.9 * rows))
    for i, (image, title) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(rows, columns, i + 1)
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    # Fixed margins: tight_layout measures every title (~1.5 s for 32 images).
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / fig.get_figheight(),
                        wspace=0.1, hspace=0.35)  # fmt: skip
    save_png(fig, path)


def save_training_curves(path: str | os.PathLike, records: list[dict]) -> None:
    """Loss and accuracy per epoch, train and test, from ``metrics.jsonl`` records.

    A population's records draw one line per member.
    """
    fig = Figure(figsize=(10, 3.8))
    loss_ax, accuracy_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    runs: dict = {}
    for record in records:
        if record.get("member") != "ensemble":
            runs.setdefault(record.get("member"), []).append(record)
    for member, rows in runs.items():
        suffix = "" if member is None else f" (member {member})"
        epochs = [r["epoch"] for r in rows]
        for ax, metric in ((loss_ax, "loss"), (accuracy_ax, "accuracy")):
            for split, style in (("train", "--"), ("test", "-")):
                ax.plot(epochs, [r[f"{split}_{metric}"] for r in rows], style, marker="o",
                        markersize=3, label=f"{split}{suffix}")  # fmt: skip
    for ax, metric in ((loss_ax, "cross-entropy loss"), (accuracy_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def save_confusion_matrix(path: str | os.PathLike, confusion: np.ndarray) -> None:
    """The confusion matrix (true label by predicted label) with its counts."""
    confusion = np.asarray(confusion)
    size = confusion.shape[0]
    fig = Figure(figsize=(1 + 0.5 * size, 0.8 + 0.5 * size))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(confusion, cmap="Blues")
    for (i, j), count in np.ndenumerate(confusion):
        color = "white" if count > confusion.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(size))
    ax.set_yticks(range(size))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"test confusion matrix ({confusion.sum()} images)")
    fig.tight_layout()
    save_png(fig, path)


def write_run_figures(
    workdir: str | os.PathLike,
    records: list[dict],
    confusion: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    num_misclassified: int = 32,
) -> None:
    """``curves.png``, ``confusion.png`` and ``misclassified.png`` (first test errors)."""
    save_training_curves(workdir_lib.path(workdir, workdir_lib.CURVES), records)
    save_confusion_matrix(workdir_lib.path(workdir, workdir_lib.CONFUSION), confusion)
    wrong = np.flatnonzero(predicted != labels)[:num_misclassified]
    titles = [f"#{i}: true {labels[i]}, predicted {predicted[i]}" for i in wrong]
    if len(wrong):
        save_image_grid(workdir_lib.path(workdir, workdir_lib.MISCLASSIFIED), images[wrong], titles)
