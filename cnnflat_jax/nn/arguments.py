"""The checks every layer function makes of its arguments, in Python, before
JAX sees them: a mistake raises a ``ValueError``/``TypeError`` that names
the function and the argument, never an XLA error. Each takes ``fn``, the
calling function's name, for its message."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Array = jnp.ndarray
IntOrPair = int | tuple[int, int]
Padding = str | Sequence[tuple[int, int]]


def is_int(value) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def pair(value: IntOrPair, name: str, fn: str) -> tuple[int, int]:
    """Returns ``value`` as a pair of positive ints, or raises naming ``name``."""
    pair = (value, value) if is_int(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(map(is_int, pair)):
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{fn}: {name} must be >= 1, got {value!r}")
    return int(pair[0]), int(pair[1])


def real(x: ArrayLike, name: str, fn: str) -> Array:
    """``x`` as an array; complex values have no order (ReLU, max) and are refused."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{fn}: {name} must be real, got dtype {x.dtype}")
    return x


def as_nhwc(x: ArrayLike, name: str, fn: str) -> tuple[Array, bool]:
    """Returns ``x`` as NHWC and whether it was a single HWC example."""
    x = real(x, name, fn)
    if x.ndim == 3:
        return x[None], True
    if x.ndim == 4:
        return x, False
    raise ValueError(
        f"{fn}: {name} must be NHWC (N, H, W, C) or HWC (H, W, C), got shape {tuple(x.shape)}"
    )


def explicit_padding(
    padding: Padding,
    in_hw: tuple[int, int],
    window_hw: tuple[int, int],
    stride_hw: tuple[int, int],
    fn: str,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resolves "SAME"/"VALID"/explicit padding to ((top, bottom), (left, right)).

    SAME follows TensorFlow: output size ceil(in / stride), and an odd total pad
    puts the extra cell at the end (bottom/right).
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0), (0, 0)
        if mode == "SAME":
            pads = []
            for size, window, stride in zip(in_hw, window_hw, stride_hw):
                out = -(-size // stride)
                total = max((out - 1) * stride + window - size, 0)
                pads.append((total // 2, total - total // 2))
            return pads[0], pads[1]
        raise ValueError(
            f"{fn}: padding must be 'SAME', 'VALID' or ((top, bottom), (left, right)), "
            f"got {padding!r}"
        )
    try:
        (top, bottom), (left, right) = padding
        pads = ((int(top), int(bottom)), (int(left), int(right)))
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: padding must be 'SAME', 'VALID' or ((top, bottom), (left, right)), "
            f"got {padding!r}"
        ) from None
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"{fn}: explicit padding must be >= 0, got {padding!r}")
    return pads


def output_size(in_hw, pads, window_hw, stride_hw, fn: str, what: str) -> tuple[int, int]:
    out = tuple(
        (size + lo + hi - window) // stride + 1
        for size, (lo, hi), window, stride in zip(in_hw, pads, window_hw, stride_hw)
    )
    if min(out) < 1:
        raise ValueError(
            f"{fn}: {what} {window_hw} does not fit the input's spatial size {in_hw} "
            f"with padding {pads}; the output would be {out}"
        )
    return out


def channel_vector(bias: ArrayLike, size: int, fn: str) -> Array:
    bias = jnp.asarray(bias)
    if bias.shape != (size,):
        raise ValueError(
            f"{fn}: bias must have shape ({size},) to match the kernel's outputs, "
            f"got shape {tuple(bias.shape)}"
        )
    return bias
