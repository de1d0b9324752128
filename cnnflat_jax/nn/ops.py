"""Pure CNN layer functions: conv2d, relu, max_pool, avg_pool, global_avg_pool,
flatten, dense and dropout.

Layouts are channels-last: images NHWC ``(N, H, W, C)`` or a single example
HWC ``(H, W, C)``; convolution kernels HWIO ``(kh, kw, C_in, C_out)``; dense
kernels ``(in, out)``. Every function is pure and works under ``jax.jit``,
``jax.grad`` and ``jax.vmap``. Shapes are checked in Python, so a mistake
raises a ``ValueError``/``TypeError`` naming the argument instead of an XLA
error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from cnnflat_jax.nn import arguments, conv, tiled_pool
from cnnflat_jax.nn.arguments import Array, IntOrPair, Padding

#: The names ``conv2d(lowering=...)`` accepts.
CONV_LOWERINGS = ("auto", *conv.LOWERINGS)

__all__ = [
    "conv2d",
    "relu",
    "max_pool",
    "avg_pool",
    "global_avg_pool",
    "flatten",
    "reorder_flat_kernel",
    "dense",
    "dropout",
    "CONV_LOWERINGS",
    "FLAT_ORDERS",
]


def conv2d(
    x: ArrayLike,
    kernel: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    stride: IntOrPair = 1,
    padding: Padding = "SAME",
    dilation: IntOrPair = 1,
    lowering: str = "auto",
) -> Array:
    r"""2-D cross-correlation, as ``keras.layers.Conv2D`` and ``flax.linen.Conv``.

    .. math::
        y[n, i, j, o] = b[o] + \sum_{p, q, c}
            x_{pad}[n, s_h i + d_h p, s_w j + d_w q, c] \; k[p, q, c, o]

    Args:
      x: input, NHWC ``(N, H, W, C_in)`` or a single example ``(H, W, C_in)``.
      kernel: HWIO ``(kh, kw, C_in, C_out)``.
      bias: optional ``(C_out,)``.
      stride: ``s``, an int or ``(s_h, s_w)``.
      padding: "SAME" (TensorFlow semantics: output ``ceil(H / s_h)``, an odd
        pad puts the extra row/column at the bottom/right), "VALID", or
        explicit ``((top, bottom), (left, right))`` zero padding.
      dilation: kernel dilation ``d``, an int or ``(d_h, d_w)``.
      lowering: how XLA computes it; values agree to float rounding.
        "lax": one ``lax.conv_general_dilated`` with JAX's own gradient
        rules (under an explicit-sharding mesh, whose kernel gradient JAX
        cannot place, "nhwc_grads"' rules). "nhwc_grads": the same
        forward, with both gradients written as plain NHWC/HWIO
        convolutions, because XLA:CPU runs JAX's transposed convolutions up
        to ~400x slower inside ``lax.scan``; reverse mode only (``grad``,
        ``vjp``, grad of grad; not ``jvp``). "im2col": the kernel taps as
        strided slices stacked along channels, then one matmul; its
        gradients and its ``vmap`` over kernels (populations) are plain
        GEMMs. "hybrid": "lax" for values (the fastest inference on CPU),
        "im2col" once differentiated or vmapped over kernels; a value under
        ``grad`` may differ from one without by float rounding.
        "auto" (default): "hybrid" on CPU, "lax" elsewhere.

    Returns:
      ``(N, H_out, W_out, C_out)``, or ``(H_out, W_out, C_out)`` for a single
      example.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(9.0).reshape(3, 3, 1)
      >>> conv2d(x, jnp.ones((2, 2, 1, 1)), padding="VALID")[..., 0]
      Array([[ 8., 12.],
             [20., 24.]], dtype=float32)
    """
    fn = "conv2d"
    x_NHWC, single = arguments.as_nhwc(x, "x", fn)
    kernel = arguments.real(kernel, "kernel", fn)
    if kernel.ndim != 4:
        raise ValueError(
            f"{fn}: kernel must be HWIO (kh, kw, C_in, C_out), got shape {tuple(kernel.shape)}"
        )
    kh, kw, c_in, c_out = kernel.shape
    if kernel.shape[2] != x_NHWC.shape[3]:
        raise ValueError(
            f"{fn}: kernel C_in={c_in} (kernel shape {tuple(kernel.shape)}) does not "
            f"match the channels of x, C={x_NHWC.shape[3]} (x shape {tuple(jnp.shape(x))})"
        )
    stride_hw = arguments.pair(stride, "stride", fn)
    dilation_hw = arguments.pair(dilation, "dilation", fn)
    effective_hw = tuple(d * (k - 1) + 1 for k, d in zip((kh, kw), dilation_hw))
    in_hw = tuple(x_NHWC.shape[1:3])
    pads = arguments.explicit_padding(padding, in_hw, effective_hw, stride_hw, fn)
    arguments.output_size(in_hw, pads, effective_hw, stride_hw, fn, "dilated kernel")
    if lowering == "auto":
        lowering = "hybrid" if jax.default_backend() == "cpu" else "lax"
    if lowering not in conv.LOWERINGS:
        raise ValueError(
            f"{fn}: lowering must be 'auto' or one of {sorted(conv.LOWERINGS)}, got {lowering!r}"
        )
    dtype = jnp.result_type(x_NHWC, kernel)
    lowered = conv.LOWERINGS[lowering]
    y_NHWC = lowered(x_NHWC.astype(dtype), kernel.astype(dtype), stride_hw, pads, dilation_hw)
    if bias is not None:
        y_NHWC = y_NHWC + arguments.channel_vector(bias, c_out, fn).reshape(1, 1, 1, c_out)
    return y_NHWC[0] if single else y_NHWC


def relu(x: ArrayLike) -> Array:
    r"""Rectified linear unit, :math:`\max(x, 0)`, elementwise; any shape.

    The gradient at exactly 0 is 0, and NaN stays NaN (as ``jax.nn.relu``), so
    a diverging network does not hide behind zeros. Complex inputs raise
    ``TypeError``.

    Example:
      >>> relu(jnp.array([-1.0, 0.0, 2.0, jnp.nan]))
      Array([ 0.,  0.,  2., nan], dtype=float32)
    """
    return _relu(arguments.real(x, "x", "relu"))


@jax.custom_jvp
def _relu(x: Array) -> Array:
    # ``max`` (NaN-propagating in XLA) fuses into a following max pool's
    # reduction, which a select does not: eval ran ~1.8x faster so.
    return jnp.maximum(x, jnp.zeros_like(x))


@_relu.defjvp
def _relu_jvp(primals, tangents):
    (x,), (tangent,) = primals, tangents
    return _relu(x), jnp.where(x <= 0, jnp.zeros_like(tangent), tangent)


def _pool(x, window, stride, padding, fn: str, reducer: str) -> Array:
    x_NHWC, single = arguments.as_nhwc(x, "x", fn)
    window_hw = arguments.pair(window, "window", fn)
    stride_hw = window_hw if stride is None else arguments.pair(stride, "stride", fn)
    in_hw = tuple(x_NHWC.shape[1:3])
    pads = arguments.explicit_padding(padding, in_hw, window_hw, stride_hw, fn)
    arguments.output_size(in_hw, pads, window_hw, stride_hw, fn, "window")
    if stride_hw == window_hw and pads == ((0, 0), (0, 0)):
        y_NHWC = tiled_pool.pool(x_NHWC, window_hw, reducer)
        return y_NHWC[0] if single else y_NHWC
    dims = (1, *window_hw, 1)
    strides = (1, *stride_hw, 1)
    padding_4d = ((0, 0), *pads, (0, 0))
    # Python-scalar init values let JAX pick its differentiable max/sum windows.
    if reducer == "max":
        if jnp.issubdtype(x_NHWC.dtype, jnp.floating):
            init = -math.inf
        else:
            init = int(jnp.iinfo(x_NHWC.dtype).min)
        y_NHWC = lax.reduce_window(x_NHWC, init, lax.max, dims, strides, padding_4d)
    else:
        if not jnp.issubdtype(x_NHWC.dtype, jnp.floating):
            x_NHWC = x_NHWC.astype(jnp.float32)
        total = lax.reduce_window(x_NHWC, 0.0, lax.add, dims, strides, padding_4d)
        if pads == ((0, 0), (0, 0)):
            y_NHWC = total / math.prod(window_hw)
        else:
            # Padded cells are not counted (Keras AveragePooling2D semantics).
            ones_HW = jnp.ones((1, *in_hw, 1), x_NHWC.dtype)
            count = lax.reduce_window(ones_HW, 0.0, lax.add, dims, strides, padding_4d)
            y_NHWC = total / count
    return y_NHWC[0] if single else y_NHWC


def max_pool(
    x: ArrayLike,
    window: IntOrPair = 2,
    *,
    stride: IntOrPair | None = None,
    padding: Padding = "VALID",
) -> Array:
    r"""Max pooling over spatial windows, as ``keras.layers.MaxPooling2D``.

    .. math:: y[n, i, j, c] = \max_{p < w_h, q < w_w} x_{pad}[n, s_h i + p, s_w j + q, c]

    Args:
      x: NHWC ``(N, H, W, C)`` or a single example ``(H, W, C)``.
      window: ``(w_h, w_w)`` or an int for a square window.
      stride: ``(s_h, s_w)`` or an int; defaults to ``window``.
      padding: "VALID" (default), "SAME" (TensorFlow semantics; padded cells
        never win) or explicit ``((top, bottom), (left, right))``.

    Returns:
      ``(N, H_out, W_out, C)`` (or ``(H_out, W_out, C)``), with
      ``H_out = (H + pads - w_h) // s_h + 1``.

    The gradient goes to each window's maximum; where several cells tie, to
    the first of them in row-major order (as TensorFlow and PyTorch).

    Example:
      >>> x = jnp.arange(16.0).reshape(4, 4, 1)
      >>> max_pool(x, 2)[..., 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    return _pool(x, window, stride, padding, "max_pool", "max")


def avg_pool(
    x: ArrayLike,
    window: IntOrPair = 2,
    *,
    stride: IntOrPair | None = None,
    padding: Padding = "VALID",
) -> Array:
    r"""Average pooling over spatial windows, as ``keras.layers.AveragePooling2D``.

    .. math:: y[n, i, j, c] = \frac{1}{|W_{ij}|} \sum_{(p, q) \in W_{ij}} x[n, p, q, c]

    where :math:`W_{ij}` is the set of *real* (unpadded) cells under window
    ``(i, j)``: with "SAME" or explicit padding, padded cells are not counted.

    Args:
      x: NHWC ``(N, H, W, C)`` or a single example ``(H, W, C)``.
      window: ``(w_h, w_w)`` or an int for a square window.
      stride: ``(s_h, s_w)`` or an int; defaults to ``window``.
      padding: "VALID" (default), "SAME" or ``((top, bottom), (left, right))``.

    Returns:
      ``(N, H_out, W_out, C)`` (or ``(H_out, W_out, C)``); integer inputs give
      float32.

    Example:
      >>> x = jnp.arange(16.0).reshape(4, 4, 1)
      >>> avg_pool(x, 2)[..., 0]
      Array([[ 2.5,  4.5],
             [10.5, 12.5]], dtype=float32)
    """
    return _pool(x, window, stride, padding, "avg_pool", "avg")


def global_avg_pool(x: ArrayLike) -> Array:
    r"""The mean of each channel over all positions, as ``keras.layers.GlobalAveragePooling2D``.

    .. math:: y[n, c] = \frac{1}{H W} \sum_{h, w} x[n, h, w, c]

    It turns maps into a vector as ``flatten`` does, but of C values instead
    of H * W * C, and the same wherever a feature lies on the map.

    Args:
      x: NHWC ``(N, H, W, C)`` or a single example ``(H, W, C)``.

    Returns:
      ``(N, C)``, or ``(C,)`` for a single example; integer inputs give float32.

    Example:
      >>> global_avg_pool(jnp.arange(8.0).reshape(2, 2, 2))
      Array([3., 4.], dtype=float32)
    """
    x_NHWC, single = arguments.as_nhwc(x, "x", "global_avg_pool")
    if not jnp.issubdtype(x_NHWC.dtype, jnp.floating):
        x_NHWC = x_NHWC.astype(jnp.float32)
    y_NC = jnp.mean(x_NHWC, axis=(1, 2))
    return y_NC[0] if single else y_NC


def dropout(x: ArrayLike, rate: float, key: jax.Array) -> Array:
    """Inverted dropout: zeroes each value with probability ``rate``, scales the rest up.

    Kept values are divided by ``1 - rate``, so the expectation over ``key`` is
    ``x`` and nothing changes at inference, where dropout is simply not
    called. Any shape.

    Args:
      x: array of any shape.
      rate: the probability of dropping a value, in [0, 1).
      key: a ``jax.random`` key; the same key drops the same values.

    Example:
      >>> y = dropout(jnp.ones(1000), 0.25, jax.random.key(0))
      >>> sorted(set(y.tolist()))
      [0.0, 1.3333333730697632]
    """
    x = arguments.real(x, "x", "dropout")
    if not 0 <= rate < 1:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate!r}")
    if rate == 0:
        return x
    keep = jax.random.bernoulli(
        key, 1.0 - rate, x.shape, out_sharding=conv.out_sharding(x, conv.mesh_axes(x))
    )
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def flatten(x: ArrayLike, *, batch_dims: int = 1) -> Array:
    """Flattens all but the leading ``batch_dims`` axes, in row-major (C) order.

    For NHWC maps, ``(N, H, W, C) -> (N, H * W * C)`` and element
    ``x[n, h, w, c]`` lands at position ``(h * W + w) * C + c``: channels vary
    fastest, then columns, then rows. This is exactly what
    ``keras.layers.Flatten()`` gives on channels_last data (PyTorch's
    ``nn.Flatten`` on NCHW maps gives the ``(c, h, w)`` order instead).

    Args:
      x: array of rank ``>= batch_dims``.
      batch_dims: leading axes to keep. Use ``batch_dims=0`` in a per-example
        function that you ``jax.vmap`` over a batch: ``(H, W, C) -> (H*W*C,)``.

    Returns:
      ``x.shape[:batch_dims] + (prod(x.shape[batch_dims:]),)``.

    Example:
      >>> flatten(jnp.zeros((8, 7, 7, 64))).shape
      (8, 3136)
      >>> flatten(jnp.arange(4).reshape(2, 1, 2), batch_dims=0)
      Array([0, 1, 2, 3], dtype=int32)
    """
    x = arguments.real(x, "x", "flatten")
    if not arguments.is_int(batch_dims) or batch_dims < 0:
        raise ValueError(f"flatten: batch_dims must be an int >= 0, got {batch_dims!r}")
    if x.ndim < batch_dims:
        raise ValueError(
            f"flatten: x must have at least batch_dims={batch_dims} axes, "
            f"got shape {tuple(x.shape)}"
        )
    keep = tuple(x.shape[: int(batch_dims)])
    return x.reshape(*keep, math.prod(x.shape[batch_dims:]))


#: The orders ``reorder_flat_kernel`` converts between, row-major ``hwc`` (this project's and
#: Keras') and channels-first ``chw`` (``torch.flatten`` of PyTorch's NCHW maps).
FLAT_ORDERS = ("hwc", "chw")


def reorder_flat_kernel(
    kernel: ArrayLike, map_hwc: Sequence[int], *, source: str, target: str
) -> Array:
    """Reorders the rows of the first dense kernel after a flatten.

    A flatten lays a map out as one vector, and the dense kernel after it has
    one row per vector position. Keras (channels_last) and ``flatten`` here
    give the ``(h, w, c)`` order; PyTorch's ``nn.Flatten`` on NCHW maps gives
    ``(c, h, w)``. The same trained layer therefore has its rows in a
    different order in each framework, and porting weights without moving
    them gives a network that runs but predicts garbage. For a map with
    ``H = 1``, ``W = 2``, ``C = 2``::

        channel 0: [a b]     flatten (h, w, c): a A b B    <- ours, Keras
        channel 1: [A B]     flatten (c, h, w): a b A B    <- PyTorch

        kernel rows, (c, h, w) order    kernel rows, (h, w, c) order
          row 0: weights of a             row 0: weights of a
          row 1: weights of b    ---->    row 1: weights of A
          row 2: weights of A             row 2: weights of b
          row 3: weights of B             row 3: weights of B

    Args:
      kernel: ``(H * W * C, out)``, rows in ``source`` order.
      map_hwc: the shape ``(H, W, C)`` of the map before the flatten.
      source: "hwc" or "chw", the order of ``kernel``'s rows.
      target: "hwc" or "chw", the order wanted.

    Returns:
      ``kernel`` with its rows in ``target`` order (a permutation: exact).

    Example:
      >>> rows = jnp.arange(4.0)[:, None]  # a, b, A, B in (c, h, w) order
      >>> reorder_flat_kernel(rows, (1, 2, 2), source="chw", target="hwc")[:, 0]
      Array([0., 2., 1., 3.], dtype=float32)
    """
    fn = "reorder_flat_kernel"
    kernel = jnp.asarray(kernel)
    for name, order in (("source", source), ("target", target)):
        if order not in FLAT_ORDERS:
            raise ValueError(f"{fn}: {name} must be one of {FLAT_ORDERS}, got {order!r}")
    if len(map_hwc) != 3 or not all(isinstance(d, int) and d >= 1 for d in map_hwc):
        raise ValueError(f"{fn}: map_hwc must be (H, W, C) positive ints, got {map_hwc!r}")
    h, w, c = map_hwc
    if kernel.ndim != 2 or kernel.shape[0] != h * w * c:
        raise ValueError(
            f"{fn}: kernel must be (H * W * C, out) = ({h * w * c}, out) for a map of "
            f"shape {tuple(map_hwc)}, got shape {tuple(kernel.shape)}"
        )
    if source == target:
        return kernel
    out = kernel.shape[1]
    if source == "chw":
        return kernel.reshape(c, h, w, out).transpose(1, 2, 0, 3).reshape(h * w * c, out)
    return kernel.reshape(h, w, c, out).transpose(2, 0, 1, 3).reshape(h * w * c, out)


def dense(x: ArrayLike, kernel: ArrayLike, bias: ArrayLike | None = None) -> Array:
    r"""Affine layer :math:`y = x W + b` over the last axis.

    Args:
      x: ``(..., in)``, e.g. ``(N, in)`` or one example ``(in,)``.
      kernel: ``W``, shape ``(in, out)``.
      bias: optional ``b``, shape ``(out,)``.

    Returns:
      ``(..., out)``.

    Example:
      >>> dense(jnp.array([1.0, 2.0]), jnp.array([[1.0], [10.0]]), jnp.array([0.5]))
      Array([21.5], dtype=float32)
    """
    fn = "dense"
    x = arguments.real(x, "x", fn)
    kernel = arguments.real(kernel, "kernel", fn)
    if kernel.ndim != 2:
        raise ValueError(f"{fn}: kernel must have shape (in, out), got shape {tuple(kernel.shape)}")
    if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"{fn}: the last axis of x (shape {tuple(x.shape)}) must equal the "
            f"kernel's input size {kernel.shape[0]} (kernel shape {tuple(kernel.shape)})"
        )
    y = jnp.matmul(x, kernel)
    if bias is not None:
        out = kernel.shape[1]
        y = y + arguments.channel_vector(bias, out, fn).reshape((1,) * (y.ndim - 1) + (out,))
    return y
