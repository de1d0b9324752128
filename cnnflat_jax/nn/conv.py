"""The ways ``ops.conv2d`` lowers a convolution to XLA, with their gradients.

Each lowering takes ``(x_NHWC, kernel_HWIO, stride, pads, dilation)``, pads
explicit ``((top, bottom), (left, right))``, and gives the same values to
float rounding; they differ in the XLA programs their gradients and ``vmap``
make. ``ops.conv2d`` documents when to use which.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

Array = jnp.ndarray


def mesh_axes(x: Array) -> tuple:
    """The mesh axes of each dimension of ``x`` in explicit-sharding mode, else Nones."""
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def out_sharding(x: Array, axes: tuple) -> P | None:
    """``PartitionSpec(*axes)`` where ``x`` is explicitly sharded, else None (JAX's choice)."""
    return P(*axes) if any(mesh_axes(x)) else None


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _canonical_conv(x_NHWC, kernel_HWIO, stride, pads, lhs_dilation, rhs_dilation, axes=None):
    """``axes``: the output's mesh axes under explicit sharding (default: the batch's)."""
    return lax.conv_general_dilated(
        x_NHWC,
        kernel_HWIO,
        window_strides=stride,
        padding=pads,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_NHWC_HWIO,
        out_sharding=out_sharding(x_NHWC, axes or (mesh_axes(x_NHWC)[0], None, None, None)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x_NHWC, kernel_HWIO, stride, pads, dilation):
    """Convolution whose gradients are also NHWC/HWIO convolutions.

    JAX's own conv transpose rules produce convolutions with permuted dimension
    numbers. Inside a ``lax.scan`` body XLA:CPU cannot re-layout those and
    falls back to a slow loop (the kernel gradient ran ~400x slower there), so
    both gradients are written here as canonical convolutions with explicit
    transposes. The values are the same as JAX's rules give.
    """
    return _canonical_conv(x_NHWC, kernel_HWIO, stride, pads, (1, 1), dilation)


def _conv_fwd(x_NHWC, kernel_HWIO, stride, pads, dilation):
    return _conv(x_NHWC, kernel_HWIO, stride, pads, dilation), (x_NHWC, kernel_HWIO)


def _conv_bwd(stride, pads, dilation, residuals, g_NHWO):
    x_NHWC, kernel_HWIO = residuals
    in_hw, out_hw, k_hw = x_NHWC.shape[1:3], g_NHWO.shape[1:3], kernel_HWIO.shape[:2]
    dx_pads, dk_pads = [], []
    for size, out, k, s, d, (lo, _) in zip(in_hw, out_hw, k_hw, stride, dilation, pads):
        # dx: full correlation of the stride-dilated g with the flipped kernel.
        before = d * (k - 1) - lo
        dx_pads.append((before, size - 1 - (out - 1) * s + lo))
        # dk: correlate x (batch as channels) with g (stride as dilation);
        # the high pad makes the output exactly k taps long (may crop).
        dk_pads.append((lo, (k - 1) * d + (out - 1) * s + 1 - size - lo))
    kernel_flipped_HWOI = jnp.flip(kernel_HWIO, (0, 1)).transpose(0, 1, 3, 2)
    dx_NHWC = _canonical_conv(g_NHWO, kernel_flipped_HWOI, (1, 1), dx_pads, stride, dilation)
    x_CHWN = x_NHWC.transpose(3, 1, 2, 0)
    g_HWNO = g_NHWO.transpose(1, 2, 0, 3)
    # The batch is contracted, so the kernel gradient is whole on every device.
    dk_CHWO = _canonical_conv(x_CHWN, g_HWNO, dilation, dk_pads, (1, 1), stride, (None,) * 4)
    return dx_NHWC, dk_CHWO.transpose(1, 2, 0, 3)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _im2col_conv(x_NHWC, kernel_HWIO, stride, pads, dilation):
    """Convolution as one matmul: im2col patches times the reshaped kernel.

    Each kernel tap ``(p, q)`` is a strided slice of the padded input; the
    taps are stacked along channels in ``(p, q, c)`` order, which is the row
    order of the HWIO kernel reshaped to ``(kh * kw * C_in, C_out)``. Only
    slices, pads and matmuls, so its gradients and its ``vmap`` over kernels
    (a population) are plain GEMMs for XLA:CPU.
    """
    kh, kw, c_in, c_out = kernel_HWIO.shape
    x_NHWC = jnp.pad(x_NHWC, ((0, 0), *pads, (0, 0)))
    n, h, w, _ = x_NHWC.shape
    out_h = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    taps = []
    for p in range(kh):
        for q in range(kw):
            top, left = p * dilation[0], q * dilation[1]
            bottom = top + stride[0] * (out_h - 1) + 1
            right = left + stride[1] * (out_w - 1) + 1
            taps.append(
                lax.slice(x_NHWC, (0, top, left, 0), (n, bottom, right, c_in), (1, *stride, 1))
            )
    kernel_KO = kernel_HWIO.reshape(kh * kw * c_in, c_out)
    if c_in == 1:
        # One input channel (a first layer): taps as the leading axis. Then the
        # kernel gradient contracts (K, N*H*W) with the output gradient as it
        # lies, and XLA moves the small patches, not the C_out-wide gradient.
        patches_KM = jnp.stack(taps).reshape(kh * kw, n * out_h * out_w)
        y_MO = lax.dot_general(patches_KM, kernel_KO, (((0,), (0,)), ((), ())))
        return y_MO.reshape(n, out_h, out_w, c_out)
    patches_NHWK = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return lax.dot_general(patches_NHWK, kernel_KO, (((3,), (0,)), ((), ())))


def _lax_conv(x_NHWC, kernel_HWIO, stride, pads, dilation):
    if any(mesh_axes(x_NHWC)):
        # JAX's own kernel-gradient rule cannot place its output under an
        # explicit-sharding mesh; nhwc_grads' rules say where it goes.
        return _conv(x_NHWC, kernel_HWIO, stride, pads, dilation)
    return _canonical_conv(x_NHWC, kernel_HWIO, stride, pads, (1, 1), dilation)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _hybrid_conv(x_NHWC, kernel_HWIO, stride, pads, dilation):
    """XLA's convolution when only values are wanted; im2col once differentiated.

    Inference runs XLA's own convolution, the fastest forward pass on CPU.
    Under ``jvp``, ``grad`` or ``vjp``, the JVP below (the im2col forward and
    its tangent) is what JAX linearizes and transposes, so the training step
    is exactly the "im2col" lowering's: GEMMs, fast inside ``lax.scan`` and
    under ``vmap`` over kernels. Values vmapped over kernels take im2col too.
    """
    conv = functools.partial(_lax_conv, stride=stride, pads=pads, dilation=dilation)

    @jax.custom_batching.custom_vmap
    def values(x_NHWC, kernel_HWIO):
        return conv(x_NHWC, kernel_HWIO)

    @values.def_vmap
    def _(axis_size, batched, x_NHWC, kernel_HWIO):
        # vmap over kernels (a population) would make XLA's convolution a
        # grouped one, which XLA:CPU runs slowly; im2col stays one GEMM each.
        lowering = _im2col_conv if batched[1] else _lax_conv
        in_axes = tuple(0 if b else None for b in batched)
        batched_conv = functools.partial(lowering, stride=stride, pads=pads, dilation=dilation)
        return jax.vmap(batched_conv, in_axes)(x_NHWC, kernel_HWIO), True

    return values(x_NHWC, kernel_HWIO)


@_hybrid_conv.defjvp
def _hybrid_conv_jvp(stride, pads, dilation, primals, tangents):
    conv = functools.partial(_im2col_conv, stride=stride, pads=pads, dilation=dilation)
    return jax.jvp(conv, primals, tangents)


# ``ops.conv2d(lowering=...)``'s names, but "auto", and their functions
# ``(x_NHWC, kernel_HWIO, stride, pads, dilation) -> y_NHWC``.
LOWERINGS = {
    "lax": _lax_conv,
    "nhwc_grads": _conv,
    "im2col": _im2col_conv,
    "hybrid": _hybrid_conv,
}
