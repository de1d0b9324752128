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
    save_image(path, image_grid(images, titles, columns))


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """An RGB uint8 image as a PNG at ``path`` (``workdir.replace_file``)."""
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(image).save(png, format="png")
    workdir_lib.replace_file(path, png.getvalue())


# ColorBrewer's 9-class Blues, light to dark (matplotlib's "Blues" runs through them).
_BLUES = np.array(
    [(247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
     (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107)], np.float64,
)  # fmt: skip
_CELL = 44  # A confusion matrix cell's side, in pixels.


def confusion_image(confusion: np.ndarray) -> np.ndarray:
    """The confusion matrix (true label by predicted label) as one RGB image: each
    cell blue in proportion to its count (white for none, darkest for the
    largest) with the count written in it, the class indices along the edges,
    the axes named and the image count in the title."""
    from PIL import Image, ImageDraw, ImageFont

    confusion = np.asarray(confusion)
    size, largest = len(confusion), max(int(confusion.max()), 1)
    left, top, bottom = 62, 34, 44  # Margins: the tick labels, the axes' names, the title.
    image = Image.new("RGB", (left + size * _CELL + 16, top + size * _CELL + bottom), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    stops = np.linspace(0, 1, len(_BLUES))
    for (i, j), count in np.ndenumerate(confusion):
        share = count / largest
        color = tuple(int(round(np.interp(share, stops, _BLUES[:, c]))) for c in range(3))
        x, y = left + j * _CELL, top + i * _CELL
        draw.rectangle((x, y, x + _CELL - 1, y + _CELL - 1), fill=color)
        ink = "white" if count > largest / 2 else "black"
        draw.text((x + _CELL / 2, y + _CELL / 2), str(count), fill=ink, font=font, anchor="mm")
    end = top + size * _CELL
    for k in range(size):
        middle = k * _CELL + _CELL / 2
        draw.text((left + middle, end + 4), str(k), fill="black", font=font, anchor="ma")
        draw.text((left - 6, top + middle), str(k), fill="black", font=font, anchor="rm")
    draw.text((left + size * _CELL / 2, end + 24), "predicted label", fill="black", font=font,
              anchor="ma")  # fmt: skip
    title = f"test confusion matrix ({confusion.sum()} images)"
    draw.text((left + size * _CELL / 2, 10), title, fill="black", font=font, anchor="ma")
    label = Image.new("RGB", (size * _CELL, 16), "white")
    ImageDraw.Draw(label).text((size * _CELL / 2, 2), "true label", fill="black", font=font,
                               anchor="ma")  # fmt: skip
    image.paste(label.rotate(90, expand=True), (4, top))
    return np.asarray(image)


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
        ax.xaxis.get_major_locator().set_params(integer=True)  # Whole epochs.
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    # Fixed margins: tight_layout measures every label first (a fifth of the time).
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.13, top=0.97, wspace=0.22)
    save_png(fig, path)


def save_confusion_matrix(path: str | os.PathLike, confusion: np.ndarray) -> None:
    """The confusion matrix with its counts, as a PNG (``confusion_image``)."""
    save_image(path, confusion_image(confusion))


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
