"""Image transforms: pixel shuffles, shifts, and random-shift augmentation (the
flatten experiments' deformations are ``benchmarks/flatten_experiments/deformations.py``).

All take and return uint8 NHWC batches ``(N, H, W, C)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def pixel_permutation(height: int, width: int, seed: int = 0) -> np.ndarray:
    """One fixed permutation of the ``height * width`` pixel positions."""
    return np.random.default_rng(seed).permutation(height * width)


def permute_pixels(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Moves every image's pixels by the same fixed permutation (channels stay together).

    Neighbouring pixels end up far apart, so local patterns vanish, but no
    information is lost: a model that ignores pixel order cannot tell.
    """
    n, h, w, c = images.shape
    order = pixel_permutation(h, w, seed)
    return images.reshape(n, h * w, c)[:, order].reshape(n, h, w, c)


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translates by ``dy`` rows down and ``dx`` columns right; uncovered pixels are 0."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src_rows, dst_rows = slice(max(-dy, 0), h - max(dy, 0)), slice(max(dy, 0), h - max(-dy, 0))
    src_cols, dst_cols = slice(max(-dx, 0), w - max(dx, 0)), slice(max(dx, 0), w - max(-dx, 0))
    out[:, dst_rows, dst_cols] = images[:, src_rows, src_cols]
    return out


def random_shift(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Moves each image by its own random ``(dy, dx)``, each uniform in
    ``[-max_shift, max_shift]``, as ``shift`` does (zero fill); traceable."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    # A window at offset (oy, ox) of the padded image is the image shifted by
    # (max_shift - oy, max_shift - ox).
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)

    def window(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(window)(padded, offsets)
