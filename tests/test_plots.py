"""The run's figures drawn as one image array: the curves, the confusion matrix, image grids."""

import numpy as np

from cnnflat_jax.run import plots


def test_the_grid_scales_each_image_by_whole_pixels_into_its_own_cell():
    images = np.zeros((10, 28, 28, 1), np.uint8)
    for k in range(10):
        images[k] = 20 * k + 30  # Each image one gray level; none is the white page.
        images[k, :14, :14] = 5  # Its top-left quarter darker.
    grid = plots.image_grid(images, [f"#{k}" for k in range(10)], columns=4)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    # 3 rows of 4 cells; each cell: a title line, the image, a gap.
    assert grid.shape[1] == 4 * plots._GRID_CELL_WIDTH
    cell_height = grid.shape[0] // 3
    side = 28 * (plots._GRID_IMAGE // 28)  # Enlarged 5x: 140 pixels.
    for k in range(10):
        top, left = cell_height * (k // 4), plots._GRID_CELL_WIDTH * (k % 4)
        cell = grid[top : top + cell_height, left : left + plots._GRID_CELL_WIDTH, 0]
        title, cell = cell[: plots._GRID_LINE + 4], cell[plots._GRID_LINE + 4 :]
        assert (title < 128).any()  # The title is written above the image.
        rows, columns = np.nonzero(cell == 20 * k + 30)
        assert rows.max() - rows.min() + 1 == side and columns.max() - columns.min() + 1 == side
        dark = np.argwhere(cell == 5)  # The quarter, enlarged by the same whole factor.
        assert dark.min(0).tolist() == [rows.min(), columns.min()]
        assert (dark.max(0) - dark.min(0) + 1).tolist() == [side // 2, side // 2]
    assert (grid[2 * cell_height :, 2 * plots._GRID_CELL_WIDTH :] == 255).all()  # No 11th.


def test_the_grid_shows_colour_images_in_colour_and_shrinks_large_ones():
    images = np.zeros((2, 300, 200, 3), np.uint8)
    images[..., 0] = 200  # Red.
    grid = plots.image_grid(images, ["a", "b"])
    red = np.all(grid == (200, 0, 0), axis=-1)
    rows, columns = np.nonzero(red[:, : plots._GRID_CELL_WIDTH])
    assert rows.max() - rows.min() + 1 == plots._GRID_IMAGE  # The longer side fits the cell.
    assert abs((columns.max() - columns.min() + 1) - plots._GRID_IMAGE * 2 / 3) <= 1


def cell_color(image, i, j, size):
    """The colour at the corner of cell (i, j) (clear of the count written in it)."""
    top = image.shape[0] - 44 - size * plots._CELL
    left = image.shape[1] - 16 - size * plots._CELL
    return image[top + i * plots._CELL + 2, left + j * plots._CELL + 2]


def test_the_confusion_matrix_darkens_with_the_count_and_writes_it():
    confusion = np.array([[50, 0, 3], [10, 40, 0], [0, 25, 100]])
    image = plots.confusion_image(confusion)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    blues = plots._BLUES.astype(np.uint8)
    np.testing.assert_array_equal(cell_color(image, 2, 2, 3), blues[-1])  # The largest.
    np.testing.assert_array_equal(cell_color(image, 0, 1, 3), blues[0])  # None.
    order = sorted(np.ndindex(3, 3), key=lambda ij: confusion[ij])
    brightness = [int(cell_color(image, i, j, 3).astype(int).sum()) for i, j in order]
    assert brightness == sorted(brightness, reverse=True)  # More: darker, never lighter.
    for i, j in np.ndindex(3, 3):  # The count's ink in each cell but the empty ones' is there.
        top = image.shape[0] - 44 - 3 * plots._CELL + i * plots._CELL
        left = image.shape[1] - 16 - 3 * plots._CELL + j * plots._CELL
        cell = image[top + 8 : top + plots._CELL - 8, left + 8 : left + plots._CELL - 8]
        assert len(np.unique(cell.reshape(-1, 3), axis=0)) > 2, (i, j)


def line_pixels(panel, color):
    """``(columns, rows)`` of ``panel``'s pixels of ``color``, outside the legend
    (the box outlined in light gray) and the margins."""
    gray = np.all(panel == (200, 200, 200), axis=-1)  # Also a shade of antialiased text.
    rows = np.flatnonzero(gray.sum(axis=1) > 30)  # The box's top and bottom edges.
    columns = np.flatnonzero(gray.sum(axis=0) > 20)  # Its sides.
    hit = np.all(panel == color, axis=-1)
    hit[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1] = False
    rows, columns = np.nonzero(hit)
    return columns, rows


def test_the_curves_plot_each_series_in_its_colour_where_its_values_lie():
    records = [
        {"epoch": e, "train_loss": 1.0, "test_loss": 2.0 - e / 5, "train_accuracy": 0.5 + e / 20,
         "test_accuracy": 0.5}
        for e in range(1, 6)
    ]  # fmt: skip
    image = plots.curves_image(records)
    assert image.shape == (plots._PANEL[1], 2 * plots._PANEL[0], 3)
    loss, accuracy = image[:, : plots._PANEL[0]], image[:, plots._PANEL[0] :]
    train, test = plots._CYCLE[:2]  # The first two colours of the cycle.
    # The test loss falls: its pixels run from the upper left to the lower right.
    assert np.corrcoef(*line_pixels(loss, test))[0, 1] > 0.9
    assert np.corrcoef(*line_pixels(accuracy, train))[0, 1] < -0.9  # The train accuracy rises.
    _, level = line_pixels(loss, train)  # Dashed, but level.
    assert level.max() - level.min() < 20 and len(level) > 100


def test_a_population_draws_a_train_and_a_test_line_per_member():
    records = [
        {"epoch": e, "member": m, "train_loss": 1.0 + m, "test_loss": 1.5 + m,
         "train_accuracy": 0.6, "test_accuracy": 0.5 + 0.1 * m}
        for e in (1, 2) for m in range(3)
    ] + [{"epoch": 2, "member": "ensemble", "test_loss": 0.1, "test_accuracy": 0.9}]  # fmt: skip
    image = plots.curves_image(records)
    for color in plots._CYCLE[:6]:
        assert np.all(image == color, axis=-1).sum() > 50, color
    assert np.all(image == plots._CYCLE[6], axis=-1).sum() == 0  # The ensemble has none.
