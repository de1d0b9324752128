"""Figures written to the workdir: plots with matplotlib's object API (no global
state), imported only when one is drawn; image grids as one array, with Pillow."""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING

import numpy as np

from cnnflat_jax.run import workdir as workdir_lib

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """The figure as a PNG at ``path``, whole or not at all, never through a link."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    workdir_lib.replace_file(path, png.getvalue())


# An image grid's cell: the image scaled to fit a square of this many pixels,
# under a title of up to two lines, in a cell this wide.
_GRID_IMAGE, _GRID_LINE, _GRID_CELL_WIDTH = 144, 13, 160


def image_grid(images: np.ndarray, titles: list[str], columns: int = 8) -> np.ndarray:
    """uint8 NHWC ``images`` (1 or 3 channels) as one RGB image: a grid of
    ``columns`` cells, each image scaled to fit its cell (whole pixels, no
    smoothing, when enlarged) under its title (one or two lines)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = math.ceil(len(images) / columns)
    title_height = _GRID_LINE * max((t.count("\n") + 1 for t in titles), default=1) + 4
    cell = (title_height + _GRID_IMAGE + 8, _GRID_CELL_WIDTH)
    grid = Image.new("RGB", (cell[1] * min(columns, len(images)) or 1, cell[0] * rows), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=11)
    for i, (image, title) in enumerate(zip(images, titles)):
        top, left = cell[0] * (i // columns), cell[1] * (i % columns)
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        scale = _GRID_IMAGE / max(picture.size)
        if scale >= 1:
            scale, resample = math.floor(scale), Image.Resampling.NEAREST
        else:
            resample = Image.Resampling.BOX
        size = tuple(max(1, round(side * scale)) for side in picture.size)
        picture = picture.resize(size, resample).convert("RGB")
        grid.paste(picture, (left + (cell[1] - size[0]) // 2, top + title_height))
        draw.multiline_text((left + cell[1] // 2, top + 2), title, fill="black", font=font,
                            anchor="ma", align="center", spacing=2)  # fmt: skip
    return np.asarray(grid)


def save_image_grid(
    path: str | os.PathLike, images: np.ndarray, titles: list[str], columns: int = 8
) -> None:
    """Saves uint8 NHWC ``images`` as a PNG grid, each with its title (``image_grid``)."""
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(image_grid(images, titles, columns)).save(png, format="png")
    workdir_lib.replace_file(path, png.getvalue())


def save_training_curves(path: str | os.PathLike, records: list[dict]) -> None:
    """Loss and accuracy per epoch, train and test, from ``metrics.jsonl`` records.

    A population's records draw one line per member.
    """
    from matplotlib.figure import Figure

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
    from matplotlib.figure import Figure

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
