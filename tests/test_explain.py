"""The flatten pictures, the run figures and the experiment transforms."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import idx_config, write_idx_dataset

from benchmarks.flatten_experiments import deformations
from cnnflat_jax.data import transforms
from cnnflat_jax.nn import models, ops
from cnnflat_jax.run import trainer
from cnnflat_jax.tools import explain


def test_flat_position_is_where_flatten_puts_each_element():
    maps = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    flat = np.asarray(ops.flatten(maps, batch_dims=0))
    for h, w, c in np.ndindex(3, 4, 5):
        assert flat[explain.flat_position((3, 4, 5), h, w, c)] == maps[h, w, c]
    # The default CNN's 7x7x64 maps: pixel (0, 1) starts after the 64 channels of (0, 0),
    # and row h = 1 after the 7 * 64 values of row 0.
    assert explain.flat_position((7, 7, 64), 0, 1, 0) == 64
    assert explain.flat_position((7, 7, 64), 1, 0, 0) == 448
    assert explain.flat_position((7, 7, 64), 6, 6, 63) == 3135


def test_object_cell_is_the_most_active_cell_and_its_strongest_channel():
    maps = np.zeros((7, 7, 4), np.float32)
    maps[2, 5] = [0.1, 0.9, 0.3, 0.2]  # Sum 1.5: the object.
    maps[6, 0] = [0, 0, 1.2, 0]  # One strong channel, a smaller sum.
    assert explain.object_cell(maps) == (2, 5, 1)


def test_stages_have_the_shapes_of_each_layer_and_flatten_matches_ops():
    model = models.CNN(num_classes=3, conv_features=(4, 6), dense_features=(5,))
    params = model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 1)))["params"]
    image = np.random.default_rng(0).integers(0, 255, (12, 12, 1), dtype=np.uint8)
    named = explain.stages(model, params, image)
    assert [(n, a.shape) for n, a in named] == [
        ("input", (12, 12, 1)),
        ("conv1 + ReLU", (12, 12, 4)),
        ("max pool 1", (6, 6, 4)),
        ("conv2 + ReLU", (6, 6, 6)),
        ("max pool 2", (3, 3, 6)),
        ("flatten", (54,)),
    ]
    np.testing.assert_array_equal(named[-1][1], np.asarray(ops.flatten(named[-2][1], batch_dims=0)))
    assert named[1][1].min() >= 0  # After the ReLU.
    np.testing.assert_allclose(named[0][1], image / 255.0, rtol=1e-6)


def test_explain_a_trained_run_and_the_run_figures(tmp_path):
    data = write_idx_dataset(tmp_path / "data", size=8)
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(idx_config(data), str(workdir))
    for name in ("curves.png", "confusion.png"):
        assert os.path.getsize(workdir / name) > 1000
    path = explain.explain(str(workdir), index=5)
    assert path == str(workdir / "explain_5.png") and os.path.getsize(path) > 1000
    with pytest.raises(ValueError, match=r"--index=37: the test split has 37 images"):
        explain.explain(str(workdir), index=37)


def test_permuted_flatten_equals_the_plain_model_with_its_dense_rows_moved():
    plain = models.CNN(num_classes=3, conv_features=(4,), dense_features=(5,))
    permuted = plain.clone(permute_flat=True)
    params = permuted.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    order = models.flat_permutation(4 * 4 * 4)
    # x[:, order] @ K == x @ K' with K'[order[i]] = K[i].
    moved = jax.tree.map(lambda x: x, params)
    kernel = np.asarray(params["Dense_0"]["kernel"])
    moved["Dense_0"]["kernel"] = kernel[np.argsort(order)]
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
    np.testing.assert_allclose(
        permuted.apply({"params": params}, x), plain.apply({"params": moved}, x), atol=1e-5
    )
    assert not np.allclose(
        permuted.apply({"params": params}, x), plain.apply({"params": params}, x)
    )


def test_strided_convs_replace_pooling():
    model = models.create_model("cnn", 10, pool="stride")
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    assert params["Conv2D_1"]["kernel"].shape == (3, 3, 32, 64)
    assert params["Dense_0"]["kernel"].shape == (7 * 7 * 64, 256)  # 28 -> 14 -> 7 by stride 2.


def test_shift_moves_pixels_and_fills_zeros():
    images = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4, 1)
    down_right = transforms.shift(images, 1, 2)[0, ..., 0]
    np.testing.assert_array_equal(
        down_right, [[0, 0, 0, 0], [0, 0, 1, 2], [0, 0, 5, 6], [0, 0, 9, 10]]
    )
    np.testing.assert_array_equal(transforms.shift(images, -1, 0)[0, :3], images[0, 1:])
    assert not transforms.shift(images, 4, 0).any()


def test_random_shift_moves_each_image_by_one_of_the_allowed_shifts():
    images = np.random.default_rng(0).integers(1, 255, (64, 6, 7, 2), dtype=np.uint8)
    out = np.asarray(transforms.random_shift(jax.random.key(3), jnp.asarray(images), 2))
    seen = set()
    for image, moved in zip(images, out):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(transforms.shift(image[None], dy, dx)[0], moved)
        ]
        assert len(matches) == 1  # Nonzero pixels: every shift looks different.
        seen.add(matches[0])
    assert len(seen) > 15  # Of the 25 shifts; all equally likely.
    again = transforms.random_shift(jax.random.key(3), jnp.asarray(images), 2)
    np.testing.assert_array_equal(np.asarray(again), out)  # Same key, same shifts.


def test_rotate_by_0_and_90_degrees_is_exact():
    images = np.random.default_rng(0).integers(0, 255, (2, 7, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(deformations.rotate(images, 0), images)
    np.testing.assert_array_equal(deformations.rotate(images, 90), np.rot90(images, 1, axes=(1, 2)))


def test_shear_by_whole_pixels_moves_each_row_by_its_offset_from_the_centre():
    images = np.random.default_rng(0).integers(0, 255, (2, 5, 9, 3), dtype=np.uint8)
    expected = np.concatenate(
        [transforms.shift(images[:, r : r + 1], 0, r - 2) for r in range(5)], axis=1
    )  # Row r moves r - 2 columns right (the centre row stays).
    np.testing.assert_array_equal(deformations.shear(images, 1.0), expected)
    np.testing.assert_array_equal(deformations.shear(images, 0.0), images)


def test_scale_by_2_doubles_distances_from_the_centre():
    images = np.zeros((1, 9, 9, 1), np.uint8)
    images[0, 3, 5, 0] = 200  # One row up, one column right of the centre (4, 4).
    zoomed = deformations.scale(images, 2.0)
    assert zoomed[0, 2, 6, 0] == 200  # Twice as far: two rows up, two columns right.
    assert zoomed[0, 4, 4, 0] == 0
    np.testing.assert_array_equal(deformations.scale(images, 1.0), images)
    shrunk = deformations.scale(zoomed, 0.5)
    assert shrunk[0, 3, 5, 0] == 200 and shrunk.sum() == 200


def test_elastic_deformation_moves_pixels_by_the_asked_root_mean_square():
    # Two ramps, 3 grey levels per pixel across and down, share one displacement field:
    # away from the border, bilinear sampling of a ramp reads the displacement back.
    cols = np.tile(np.arange(64), (64, 1))
    images = np.stack([3 * cols, 3 * cols.T], -1)[None].astype(np.uint8)
    np.testing.assert_array_equal(deformations.elastic(images, 0.0), images)
    for alpha in (1.0, 3.0):
        moved = deformations.elastic(images, alpha).astype(float)[0, 10:-10, 10:-10]
        shift_yx = (moved - images[0, 10:-10, 10:-10]) / 3
        rms = np.sqrt(np.mean(np.sum(shift_yx**2, axis=-1)))
        # The whole field's RMS is alpha; the blur's zero border damps the edges, so the
        # interior moves a little more.
        assert alpha <= rms <= 1.25 * alpha, (alpha, rms)
    np.testing.assert_array_equal(
        deformations.elastic(images, 1.0), deformations.elastic(images, 1.0)
    )
    assert not np.array_equal(
        deformations.elastic(images, 1.0, seed=1), deformations.elastic(images, 1.0)
    )


def test_permute_pixels_is_one_fixed_shuffle_of_positions():
    images = np.random.default_rng(0).integers(0, 255, (3, 5, 6, 2), dtype=np.uint8)
    shuffled = transforms.permute_pixels(images)
    order = transforms.pixel_permutation(5, 6)
    np.testing.assert_array_equal(shuffled.reshape(3, 30, 2), images.reshape(3, 30, 2)[:, order])
    assert not np.array_equal(shuffled, images)
    np.testing.assert_array_equal(transforms.permute_pixels(images[1:2]), shuffled[1:2])
