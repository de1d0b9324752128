"""Figures written to the workdir (matplotlib's object API: no global state)."""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.figure import Figure


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
