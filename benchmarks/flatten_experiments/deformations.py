"""The deformations the flatten experiments measure models under: rotations,
shears, scalings and elastic deformations, each resampled bilinearly about the
image's centre. All take and return uint8 NHWC batches ``(N, H, W, C)``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _warp(images: jax.Array, matrix: jax.Array, offsets: jax.Array) -> jax.Array:
    """Output pixel p samples the input (bilinear, 0 outside) at ``centre + matrix @
    (p - centre) + offsets[:, p]``: an affine map about the centre plus, per image, a
    displacement field ``offsets`` (N, 2, H, W) in rows and columns."""
    n, h, w, c = images.shape
    rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    src_r = cy + matrix[0, 0] * (rows - cy) + matrix[0, 1] * (cols - cx)
    src_c = cx + matrix[1, 0] * (rows - cy) + matrix[1, 1] * (cols - cx)

    def one(channel_HW, offset_2HW):
        where = [src_r + offset_2HW[0], src_c + offset_2HW[1]]
        return jax.scipy.ndimage.map_coordinates(channel_HW, where, order=1, cval=0.0)

    per_channel = jax.vmap(jax.vmap(one, in_axes=(2, None), out_axes=2))  # Images, channels.
    return per_channel(images.astype(jnp.float32), offsets)


def warp(images: np.ndarray, matrix, offsets: np.ndarray | None = None) -> np.ndarray:
    """``images`` resampled through ``_warp``, rounded back to uint8."""
    n, h, w, _ = images.shape
    offsets = np.zeros((n, 2, h, w), np.float32) if offsets is None else offsets
    warped = _warp(jnp.asarray(images), jnp.asarray(matrix, jnp.float32), jnp.asarray(offsets))
    return np.asarray(jnp.clip(jnp.round(warped), 0, 255)).astype(np.uint8)


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotates counter-clockwise about the centre (bilinear; outside pixels are 0)."""
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # Output pixel (r, c) samples the input at the inverse rotation of (r, c).
    return warp(images, [[cos, sin], [-sin, cos]])


def shear(images: np.ndarray, factor: float) -> np.ndarray:
    """Horizontal shear about the centre: row r moves ``factor * (r - centre)`` columns
    right (bilinear; outside pixels are 0)."""
    return warp(images, [[1.0, 0.0], [-factor, 1.0]])


def scale(images: np.ndarray, factor: float) -> np.ndarray:
    """Zooms about the centre: ``factor`` > 1 enlarges (bilinear; outside pixels are 0)."""
    return warp(images, [[1 / factor, 0.0], [0.0, 1 / factor]])


def _smooth(field: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur (std ``sigma`` pixels, zero outside) of the last two axes."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    blur = lambda v: np.convolve(v, taps, mode="same")  # noqa: E731
    return np.apply_along_axis(blur, -1, np.apply_along_axis(blur, -2, field))


def elastic(images: np.ndarray, alpha: float, sigma: float = 4.0, seed: int = 0) -> np.ndarray:
    """Elastic deformation (Simard et al., 2003): each image is resampled through its own
    random displacement field: uniform noise in [-1, 1] per pixel and axis, blurred by a
    Gaussian of std ``sigma`` pixels, scaled to a root-mean-square displacement of
    ``alpha`` pixels."""
    n, h, w, _ = images.shape
    field = _smooth(np.random.default_rng(seed).uniform(-1, 1, (n, 2, h, w)), sigma)
    rms = np.sqrt(np.mean(np.sum(field**2, axis=1), axis=(1, 2)))
    offsets = alpha * field / rms[:, None, None, None]
    return warp(images, np.eye(2), offsets.astype(np.float32))
