"""Pooling whose windows tile the input (stride = window, VALID): ``ops.max_pool``'s
and ``ops.avg_pool``'s fast path, values fused by XLA:CPU with the ReLU before them
and derivatives written as reshapes instead of ``reduce_window``'s gradients."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from cnnflat_jax.nn import conv

Array = jax.Array


def pool(x_NHWC: Array, window_hw: tuple[int, int], reducer: str) -> Array:
    """Pooling whose windows tile the input (stride = window, VALID).

    Rows and columns that no window covers are dropped (as VALID does).
    """
    if reducer == "max":
        return _max(x_NHWC, window_hw)
    if not jnp.issubdtype(x_NHWC.dtype, jnp.floating):
        x_NHWC = x_NHWC.astype(jnp.float32)
    return _mean(x_NHWC, window_hw)


def _windows(x_NHWC: Array, window_hw: tuple[int, int]) -> Array:
    """``(N, Ho, wh, Wo, ww, C)``: the tiling windows as two axes (VALID crop)."""
    n, h, w, c = x_NHWC.shape
    (wh, ww), out_h, out_w = window_hw, h // window_hw[0], w // window_hw[1]
    # Under an explicit-sharding mesh JAX asks where a split axis goes: the
    # windows' cells stay with their rows and columns.
    n_axis, h_axis, w_axis, c_axis = conv.mesh_axes(x_NHWC)
    sharding = conv.out_sharding(x_NHWC, (n_axis, h_axis, None, w_axis, None, c_axis))
    cropped = x_NHWC[:, : out_h * wh, : out_w * ww]
    return lax.reshape(cropped, (n, out_h, wh, out_w, ww, c), out_sharding=sharding)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max(x_NHWC: Array, window_hw: tuple[int, int]) -> Array:
    """Max over tiling windows; derivative: each window's first maximum.

    Values come from ``reduce_window``, which XLA:CPU fuses with the ReLU
    before it. The derivative picks each window's first maximum in
    row-major order, as XLA's select-and-scatter (and so TensorFlow and
    PyTorch) does, instead of ``jnp.max``'s even split among ties. It is
    written as a JVP that is linear in the tangent (a one-hot mask over the
    reshaped windows, then a sum), so ``grad`` is JAX's transpose of it: one
    broadcast-and-select that XLA fuses with the ReLU's gradient, not the
    generic scatter that XLA:CPU makes of ``reduce_window``'s gradient.
    """
    floating = jnp.issubdtype(x_NHWC.dtype, jnp.floating)
    init = -math.inf if floating else int(jnp.iinfo(x_NHWC.dtype).min)
    dims = (1, *window_hw, 1)
    return lax.reduce_window(x_NHWC, init, lax.max, dims, dims, "VALID")


@_max.defjvp
def _max_jvp(window_hw, primals, tangents):
    (x_NHWC,), (tangent_NHWC,) = primals, tangents
    windows, tangent = _windows(x_NHWC, window_hw), _windows(tangent_NHWC, window_hw)
    (wh, ww), y = window_hw, windows.max(axis=(2, 4))
    shape = (1, 1, wh, 1, ww, 1)
    row, column = (lax.broadcasted_iota(jnp.int32, shape, axis) for axis in (2, 4))
    cell = row * ww + column  # Each cell's row-major position in its window.
    is_max = windows == y[:, :, None, :, None, :]
    first = jnp.min(jnp.where(is_max, cell, wh * ww), axis=(2, 4))
    picked = cell == first[:, :, None, :, None, :]
    return y, jnp.sum(jnp.where(picked, tangent, jnp.zeros_like(tangent)), axis=(2, 4))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _mean(x_NHWC: Array, window_hw: tuple[int, int]) -> Array:
    """Mean over tiling windows of a float array; derivative: the mean of the tangent.

    Values come from ``reduce_window``'s sum, which XLA:CPU fuses with the
    ReLU before it (eval 1.5-2x a mean over reshaped windows on a 2-core
    AVX2 CPU). The derivative is the mean over the windows as two axes of a
    reshape, linear in the tangent, so ``grad`` is one broadcast that XLA
    fuses with its neighbours, not the padded ``reduce_window`` that JAX
    makes of the sum's transpose.
    """
    dims = (1, *window_hw, 1)
    zero = jnp.zeros((), x_NHWC.dtype)
    total = lax.reduce_window(x_NHWC, zero, lax.add, dims, dims, "VALID")
    return total / (window_hw[0] * window_hw[1])


@_mean.defjvp
def _mean_jvp(window_hw, primals, tangents):
    (x_NHWC,), (tangent_NHWC,) = primals, tangents
    return _mean(x_NHWC, window_hw), _windows(tangent_NHWC, window_hw).mean(axis=(2, 4))
