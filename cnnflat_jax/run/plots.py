"""The figures a run writes to its workdir, each drawn as one RGB array with Pillow
and saved as a PNG: the training curves, the confusion matrix and image grids.
(matplotlib drew them before: importing it and laying them out cost a short run
nearly a second.)"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from cnnflat_jax.run import workdir as workdir_lib

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


# matplotlib's default colour cycle (tab10): each line takes the next colour.
_CYCLE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
_PANEL = (500, 380)  # One panel of the curves: width, height in pixels.
_PLOT = (70, 12, 12, 44)  # The plot area's margins in a panel: left, top, right, bottom.


def nice_ticks(low: float, high: float, count: int = 6, whole: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart; whole
    numbers if ``whole``) covering ``[low, high]`` with about ``count`` ticks."""
    span = max(high - low, abs(high) * 1e-3, 1e-12)
    raw = span / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    step = max(round(step), 1) if whole else step
    first = math.floor(low / step) * step
    return [first + k * step for k in range(math.ceil((high - first) / step - 1e-9) + 1)]


def _decimals(step: float) -> int:
    """Decimals that write every multiple of ``step`` exactly (0.25: 2, 0.5: 1)."""
    return next(d for d in range(12) if abs(step * 10**d - round(step * 10**d)) < 1e-6)


def line_panel(
    series: list[tuple[str, str, list[float], list[float]]], x_label: str, y_label: str
) -> np.ndarray:
    """One chart as an RGB image: ``(label, style, xs, ys)`` lines ("-" solid,
    "--" dashed) with round markers, in the colour cycle's order, on round
    ticks with a light grid, a legend in the corner with the fewest points and
    named axes. The x values are whole numbers (epochs)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", _PANEL, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    left, top = _PLOT[0], _PLOT[1]
    right, bottom = _PANEL[0] - _PLOT[2], _PANEL[1] - _PLOT[3]
    xs = [x for _, _, line_xs, _ in series for x in line_xs]
    ys = [y for _, _, _, line_ys in series for y in line_ys]
    x_pad = 0.05 * (max(xs) - min(xs)) or 0.5
    x_low, x_high = min(xs) - x_pad, max(xs) + x_pad
    x_ticks = [t for t in nice_ticks(min(xs), max(xs), whole=True) if min(xs) <= t <= max(xs)]
    pad = 0.05 * ((max(ys) - min(ys)) or abs(max(ys)) or 1)
    y_ticks = nice_ticks(min(ys) - pad, max(ys) + pad)
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def at(x, y):
        return (
            left + (x - x_low) / (x_high - x_low) * (right - left),
            bottom - (y - y_low) / (y_high - y_low) * (bottom - top),
        )

    decimals = _decimals(y_ticks[1] - y_ticks[0])
    for x in x_ticks:
        px = at(x, y_low)[0]
        draw.line((px, top, px, bottom), fill=(225, 225, 225))
        draw.text((px, bottom + 5), f"{x:g}", fill="black", font=font, anchor="ma")
    for y in y_ticks:
        py = at(x_low, y)[1]
        draw.line((left, py, right, py), fill=(225, 225, 225))
        draw.text((left - 5, py), f"{y:.{decimals}f}", fill="black", font=font, anchor="rm")
    draw.rectangle((left, top, right, bottom), outline="black")
    points = [[at(x, y) for x, y in zip(line_xs, line_ys)] for *_, line_xs, line_ys in series]
    for k, ((_, style, *_), line) in enumerate(zip(series, points)):
        color = _CYCLE[k % len(_CYCLE)]
        for a, b in zip(line, line[1:]):
            _segment(draw, a, b, color, dashed=style == "--")
        for px, py in line:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
    width = max(draw.textlength(label, font=font) for label, *_ in series) + 44
    height = 6 + 17 * len(series)
    corners = [
        (x, y) for y in (top + 8, bottom - 8 - height) for x in (right - 8 - width, left + 8)
    ]
    covered = [
        sum(x <= px <= x + width and y <= py <= y + height for line in points for px, py in line)
        for x, y in corners
    ]
    x, y = corners[covered.index(min(covered))]  # The first of the least covered.
    draw.rectangle((x, y, x + width, y + height), fill="white", outline=(200, 200, 200))
    for k, (label, style, *_) in enumerate(series):
        row = y + 11 + 17 * k
        _segment(draw, (x + 6, row), (x + 30, row), _CYCLE[k % len(_CYCLE)], style == "--")
        draw.text((x + 36, row), label, fill="black", font=font, anchor="lm")
    draw.text(((left + right) / 2, _PANEL[1] - 6), x_label, fill="black", font=font, anchor="md")
    label = Image.new("RGB", (bottom - top, 16), "white")
    ImageDraw.Draw(label).text(
        ((bottom - top) / 2, 2), y_label, fill="black", font=font, anchor="ma"
    )
    image.paste(label.rotate(90, expand=True), (4, top))
    return np.asarray(image)


def _segment(draw, a, b, color, dashed: bool) -> None:
    """A line from ``a`` to ``b``, 2 pixels wide; dashed: 7 on, 4 off."""
    if not dashed:
        draw.line((*a, *b), fill=color, width=2)
        return
    length = max(math.dist(a, b), 1e-9)
    for start in np.arange(0, length, 11.0):
        s, e = start / length, min(start + 7, length) / length
        begin = (a[0] + s * (b[0] - a[0]), a[1] + s * (b[1] - a[1]))
        draw.line((*begin, a[0] + e * (b[0] - a[0]), a[1] + e * (b[1] - a[1])), fill=color, width=2)


def curves_image(records: list[dict]) -> np.ndarray:
    """Loss and accuracy per epoch, train (dashed) and test (solid), side by side,
    from ``metrics.jsonl`` records; a population's draw one pair per member."""
    runs: dict = {}
    for record in records:
        if record.get("member") != "ensemble":
            runs.setdefault(record.get("member"), []).append(record)
    panels = []
    for metric, name in (("loss", "cross-entropy loss"), ("accuracy", "accuracy")):
        series = []
        for member, rows in runs.items():
            suffix = "" if member is None else f" (member {member})"
            epochs = [r["epoch"] for r in rows]
            for split, style in (("train", "--"), ("test", "-")):
                values = [r[f"{split}_{metric}"] for r in rows]
                series.append((f"{split}{suffix}", style, epochs, values))
        panels.append(line_panel(series, "epoch", name))
    return np.concatenate(panels, axis=1)


def save_training_curves(path: str | os.PathLike, records: list[dict]) -> None:
    """The curves as a PNG (``curves_image``)."""
    save_image(path, curves_image(records))


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
