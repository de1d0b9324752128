"""One picture of conv -> ReLU -> pool -> flatten for a trained model and a test image.

    python -m cnnflat_jax.explain --workdir runs/default --index 0

Writes ``explain_<index>.png`` to the workdir (or ``--output``): the input, each conv layer's
feature maps after the ReLU, the pooled maps, and the flattened vector as a
strip, each labelled with its shape and size (e.g. 7x7x64 -> 3136) and with
its own colour scale. A zoom on the vector shows the positions of the cells
where the object responds most, linked to one cell of the last map's
mosaic, and two rulers make the flatten order visible: for every zoomed
position, the channel it came from and the spatial position (h, w).
"""

from __future__ import annotations

import io
import math
import os

import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, Rectangle

from cnnflat_jax.data import input_pipeline
from cnnflat_jax.nn import models
from cnnflat_jax.run import trained_run
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.tools import command
from cnnflat_jax.train import train_lib

__all__ = [
    "flat_position",
    "stages",
    "object_cell",
    "figure",
    "explain",
    "main",
]


def flat_position(map_hwc: tuple[int, int, int], h: int, w: int, c: int) -> int:
    """Where ``flatten`` puts element ``(h, w, c)`` of an ``(H, W, C)`` map."""
    _, width, channels = map_hwc
    return (h * width + w) * channels + c


def stages(model, params, image_HWC: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` for the input and every sown stage of ``model`` on one image."""
    x = train_lib.normalize_images(image_HWC[None])
    _, state = model.apply({"params": params}, x, mutable=["intermediates"])
    result, previous, convs, pools = [("input", np.asarray(x[0]))], "", 0, 0
    for kind, value in models.sown_layers(state["intermediates"]):
        if kind == "conv":
            convs += 1
        elif kind == "relu" and previous == "conv":
            result.append((f"conv{convs} + ReLU", np.asarray(value[0][0])))
        elif kind in ("max_pool", "avg_pool"):
            pools += 1
            result.append((f"{kind.removesuffix('_pool')} pool {pools}", np.asarray(value[0][0])))
        elif kind in ("flatten", "global_avg_pool"):
            result.append((kind.replace("_", " "), np.asarray(value[0][0])))
            break  # What comes after is dense layers on the vector.
        previous = kind
    return result


def _mosaic(maps_HWC: np.ndarray, columns: int) -> np.ndarray:
    """Tiles the channels of a map side by side, separated by NaN lines."""
    h, w, c = maps_HWC.shape
    rows = math.ceil(c / columns)
    out = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1), np.nan)
    for k in range(c):
        r, col = divmod(k, columns)
        out[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = maps_HWC[..., k]
    return out


def _size(shape) -> str:
    return "x".join(map(str, shape)) + f" ({math.prod(shape)})"


def object_cell(maps_HWC: np.ndarray) -> tuple[int, int, int]:
    """``(h, w, c)``: the cell of the map where the object responds most (the largest
    sum over channels), and that cell's strongest channel."""
    h, w = np.unravel_index(np.argmax(maps_HWC.sum(axis=-1)), maps_HWC.shape[:2])
    return int(h), int(w), int(np.argmax(maps_HWC[h, w]))


def figure(named_stages: list[tuple[str, np.ndarray]], title: str) -> Figure:
    """The picture: a row per map stage (each with its colour scale), the flattened
    strip, and a zoom on the object's positions in it, linked to its mosaic tile."""
    maps = named_stages[:-1]
    flat = named_stages[-1][1]
    h, w, c = map_hwc = maps[-1][1].shape
    cell_h, cell_w, cell_c = object_cell(maps[-1][1])
    columns = 16
    fig = Figure(figsize=(12, 1.6 * len(maps) + 4.2))
    grid = fig.add_gridspec(len(maps) + 4, 1, height_ratios=[3] * len(maps) + [1.1] * 4)
    for row, (name, array) in enumerate(maps):
        ax = fig.add_subplot(grid[row])
        per_row = 1 if array.shape[-1] == 1 else columns
        shown = ax.imshow(_mosaic(array, per_row), cmap="gray" if name == "input" else "viridis")
        fig.colorbar(shown, ax=ax, fraction=0.02, pad=0.01, label="value")
        ax.set_title(f"{name}: {_size(array.shape)}", fontsize=9, loc="left")
        ax.axis("off")
    mosaic_ax = ax  # The last map: its tile of channel cell_c, cell (cell_h, cell_w).
    tile_r, tile_c = divmod(cell_c, columns)
    corner = (tile_c * (w + 1) + cell_w - 0.5, tile_r * (h + 1) + cell_h - 0.5)
    mosaic_ax.add_patch(Rectangle(corner, 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    # The zoom: the object's cell and its left and right neighbours, c positions each.
    first_w, last_w = max(cell_w - 1, 0), min(cell_w + 1, w - 1)
    start = flat_position(map_hwc, cell_h, first_w, 0)
    stop = flat_position(map_hwc, cell_h, last_w, c - 1) + 1
    linked = flat_position(map_hwc, cell_h, cell_w, cell_c)
    pixel_ticks = [
        (flat_position(map_hwc, cell_h, j, 0) - start, f"{flat_position(map_hwc, cell_h, j, 0)}:"
         f" (h={cell_h}, w={j}), c=0..{c - 1}")
        for j in range(first_w, last_w + 1)
    ]  # fmt: skip
    strips = [
        (f"flatten: {'x'.join(map(str, map_hwc))} -> {flat.size} values "
         "(ticks: where each row h of the map starts)", flat, "viridis", "value",
         [(flat_position(map_hwc, i, 0, 0), f"h={i}") for i in range(h)]),
        (f"zoom on the object: positions {start}..{stop - 1}, the cells (h={cell_h}, "
         f"w={first_w}..{last_w}) of the last map. Red line: position {linked} = channel "
         f"{cell_c} at (h={cell_h}, w={cell_w}), the red square in the mosaic",
         flat[start:stop], "viridis", "value", pixel_ticks),
        ("channel c of each zoomed position: c varies fastest", np.tile(np.arange(c),
         stop // c - start // c), "twilight", "channel", []),
        ("pixel (h, w) of each zoomed position: a block of C channels per pixel",
         np.repeat(np.arange(first_w, last_w + 1), c), "Pastel1", "w", []),
    ]  # fmt: skip
    for row, (name, strip, cmap, label, ticks) in enumerate(strips):
        ax = fig.add_subplot(grid[len(maps) + row])
        shown = ax.imshow(strip[None, :], aspect="auto", cmap=cmap, interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.02, pad=0.01, label=label)
        ax.set_yticks([])
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xticks([t for t, _ in ticks], [text for _, text in ticks], fontsize=7)
        if row == 0:
            ax.axvspan(start, stop - 1, color="red", alpha=0.25)  # Where the zoom is.
        if row == 1:
            ax.axvline(linked - start, color="red", linewidth=1.5)
            link = ConnectionPatch(
                xyA=(corner[0] + 0.5, corner[1] + 1), coordsA=mosaic_ax.transData,
                xyB=(linked - start, -0.5), coordsB=ax.transData, color="red", linewidth=1,
            )  # fmt: skip
            fig.add_artist(link)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def explain(
    workdir: str, index: int = 0, member: int | None = None, output: str | None = None
) -> str:
    """Draws ``figure`` for test image ``index`` of the run in ``workdir``.

    Writes ``output`` (default ``workdir/explain_<index>.png``) and returns its path.
    """
    run = trained_run.load_run(workdir, member)
    config = run.config
    data = input_pipeline.load_dataset(
        config.dataset,
        source=config.data_source,
        data_dir=config.data_dir or None,
        idx_dir=config.idx_dir or None,
        part=input_pipeline.Part(num_train=1),
        num_classes=config.get("num_classes", 0),  # Workdirs from before the field: 0.
        image_size=tuple(config.get("image_size", (28, 28))),
        image_channels=config.get("image_channels", 1),
        held_out=config.get("validation_examples", 0),
    )
    if not 0 <= index < len(data.test_labels):
        raise ValueError(f"--index={index}: the test split has {len(data.test_labels)} images")
    model, params = run.model, run.params
    image = data.test_images[index]
    named = stages(model, params, image)
    logits = model.apply({"params": params}, train_lib.normalize_images(image[None]))
    predicted = int(np.asarray(jax.numpy.argmax(logits[0])))
    names = data.class_names
    label = int(data.test_labels[index])
    title = (
        f"{data.name} test image {index}: label {label} ({names[label]}), "
        f"predicted {predicted} ({names[predicted]})"
    )
    path = output or workdir_lib.path(workdir, workdir_lib.explain_figure(index))
    _save_png(figure(named, title), path)
    return path


def _save_png(fig: Figure, path: str | os.PathLike) -> None:
    """The figure as a PNG at ``path``, whole or not at all, never through a link."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    workdir_lib.replace_file(path, png.getvalue())


def main() -> None:
    """The command line (flags are defined here, so importing the module defines none)."""
    from absl import app, flags

    workdir = flags.DEFINE_string("workdir", None, "A train.py workdir.", required=True)
    index = flags.DEFINE_integer("index", 0, "Which test image.")
    member = flags.DEFINE_integer("member", None, "For a population: which member.")
    output = flags.DEFINE_string("output", None, "The PNG to write; default W/explain_<index>.png.")

    def run(argv):
        del argv
        with command.one_line_failures(ValueError):
            path = explain(workdir.value, index.value, member.value, output.value)
        print(path)

    app.run(run)
