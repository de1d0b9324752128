"""ops vs numpy/scipy references, hand-computed values, gradients and errors."""

import doctest
import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from helpers import conv2d_ref, loaded_by, pool_ref, resolve_pads
from jax import lax
from jax.test_util import check_grads

from cnnflat_jax.nn import ops

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _own_data(request):
    """Each test draws its data from a seed of its own (its id's CRC-32), whatever
    ran before it: pytest-xdist runs the tests in another order every time."""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def rand(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def out_size(size, window, stride, pads):
    return (size + sum(pads) - window) // stride + 1


CONV_GRID = list(
    itertools.product(
        [(7, 7), (8, 5)],  # input H, W
        [(3, 3), (1, 1), (2, 3)],  # kernel
        [1, 2, (2, 1)],  # stride
        [1, 2],  # dilation
        ["SAME", "VALID", ((1, 2), (0, 1))],
    )
)


@pytest.mark.parametrize("lowering", ["lax", "nhwc_grads", "im2col", "hybrid"])
@pytest.mark.parametrize("hw,khw,stride,dilation,padding", CONV_GRID)
def test_conv2d_matches_numpy_reference_and_predicted_shape(
    hw, khw, stride, dilation, padding, lowering
):
    x, k, b = rand(2, *hw, 3), rand(*khw, 3, 4), rand(4)
    s = (stride, stride) if isinstance(stride, int) else stride
    d = (dilation, dilation)
    y = ops.conv2d(x, k, b, stride=stride, padding=padding, dilation=dilation, lowering=lowering)
    eff = tuple(di * (kk - 1) + 1 for di, kk in zip(d, khw))
    if padding == "SAME":  # TF rule: ceil(in / stride), whatever the kernel.
        expected_hw = tuple(-(-size // st) for size, st in zip(hw, s))
    else:
        pads = resolve_pads(padding, hw, eff, s)
        expected_hw = tuple(out_size(*args) for args in zip(hw, eff, s, pads))
    assert y.shape == (2, *expected_hw, 4)
    np.testing.assert_allclose(y, conv2d_ref(x, k, b, s, padding, d), rtol=1e-5, atol=1e-5)


def test_conv2d_matches_scipy_correlate2d():
    x, k = rand(9, 11), rand(3, 4)
    y = ops.conv2d(x[:, :, None], k[:, :, None, None], padding="VALID")[:, :, 0]
    np.testing.assert_allclose(
        y, scipy.signal.correlate2d(x, k, mode="valid"), rtol=1e-5, atol=1e-5
    )


def test_conv2d_same_puts_the_extra_pad_at_the_end():
    x = jnp.arange(1.0, 5.0).reshape(1, 4, 1)  # one row: 1 2 3 4
    k = jnp.array([10.0, 1.0]).reshape(1, 2, 1, 1)
    # Width-2 kernel, SAME: total pad 1, all of it on the right.
    np.testing.assert_array_equal(ops.conv2d(x, k)[0, :, 0], [12.0, 23.0, 34.0, 40.0])


def test_conv2d_hand_computed_with_stride_and_bias():
    x = jnp.arange(16.0).reshape(4, 4, 1)
    k = jnp.array([[1.0, 0.0], [0.0, -1.0]]).reshape(2, 2, 1, 1)
    y = ops.conv2d(x, k, jnp.array([0.5]), stride=2, padding="VALID")
    # Each output is x[i, j] - x[i+1, j+1] = -5, plus the bias.
    np.testing.assert_array_equal(y[..., 0], [[-4.5, -4.5], [-4.5, -4.5]])


def test_relu_hand_values_and_gradient_at_zero():
    x = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(ops.relu(x), [0.0, 0.0, 3.0])
    np.testing.assert_array_equal(jax.grad(lambda x: ops.relu(x).sum())(x), [0.0, 0.0, 1.0])


POOL_GRID = list(
    itertools.product(
        [(7, 7), (6, 9)],
        [2, 3, (2, 3)],  # window
        [None, 1, 2],  # stride
        ["VALID", "SAME", ((1, 0), (0, 1))],
        ["max", "avg"],
    )
)


@pytest.mark.parametrize("hw,window,stride,padding,kind", POOL_GRID)
def test_pools_match_numpy_reference(hw, window, stride, padding, kind):
    x = rand(2, *hw, 3)
    pool = ops.max_pool if kind == "max" else ops.avg_pool
    y = pool(x, window, stride=stride, padding=padding)
    w = (window, window) if isinstance(window, int) else window
    s = w if stride is None else (stride, stride)
    np.testing.assert_allclose(y, pool_ref(x, w, s, padding, kind), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lowering", ["im2col", "hybrid"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, "SAME", 1), (2, ((0, 2), (1, 0)), 2)])
def test_conv2d_one_input_channel_matches_reference_and_lax_gradients(
    stride, padding, dilation, lowering
):
    # One input channel takes its own im2col layout (taps as the leading axis).
    x, k, b = rand(3, 9, 8, 1), rand(3, 2, 1, 5), rand(5)
    y = ops.conv2d(x, k, b, stride=stride, padding=padding, dilation=dilation, lowering=lowering)
    s, d = (stride, stride), (dilation, dilation)
    np.testing.assert_allclose(y, conv2d_ref(x, k, b, s, padding, d), rtol=1e-5, atol=1e-5)
    g = rand(*y.shape)

    def grads(low):
        def loss(x, k):
            y = ops.conv2d(x, k, stride=stride, padding=padding, dilation=dilation, lowering=low)
            return jnp.sum(y * g)

        return jax.grad(loss, (0, 1))(x, k)

    for ours, reference in zip(grads(lowering), grads("lax")):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_conv2d_hybrid_is_lax_for_values_and_im2col_once_differentiated():
    x, k = rand(2, 6, 6, 3), rand(3, 3, 3, 4)

    def values(lowering):
        return jax.jit(functools.partial(ops.conv2d, lowering=lowering))(x, k)

    def jvp_values(lowering):
        conv = functools.partial(ops.conv2d, lowering=lowering)
        return jax.jvp(conv, (x, k), (x, k))[0]

    np.testing.assert_allclose(values("lax"), jvp_values("im2col"), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(values("hybrid"), values("lax"))
    np.testing.assert_array_equal(jvp_values("hybrid"), jvp_values("im2col"))


def test_conv2d_auto_is_hybrid_on_cpu_and_lax_elsewhere():
    x, k = rand(2, 6, 6, 3), rand(3, 3, 3, 4)
    chosen = "hybrid" if jax.default_backend() == "cpu" else "lax"

    def grad_of(lowering):
        return jax.grad(lambda k: jnp.sum(ops.conv2d(x, k, lowering=lowering) ** 2))(k)

    np.testing.assert_array_equal(
        jax.jit(ops.conv2d)(x, k), jax.jit(functools.partial(ops.conv2d, lowering=chosen))(x, k)
    )
    np.testing.assert_array_equal(grad_of("auto"), grad_of(chosen))


@pytest.mark.parametrize("in_axes", [(None, 0), (0, None), (0, 0)])
def test_conv2d_hybrid_under_vmap_matches_lax(in_axes):
    # vmap over kernels (a population) takes im2col, over images XLA's conv.
    x, k = rand(3, 2, 7, 6, 2), rand(3, 3, 3, 2, 4)
    args = [a if axis == 0 else a[0] for a, axis in zip((x, k), in_axes)]

    def conv(low):
        return jax.vmap(lambda x, k: ops.conv2d(x, k, stride=2, lowering=low), in_axes)

    np.testing.assert_allclose(conv("hybrid")(*args), conv("lax")(*args), rtol=1e-5, atol=1e-5)
    g = rand(*conv("lax")(*args).shape)

    def grads(low):
        return jax.grad(lambda x, k: jnp.sum(conv(low)(x, k) * g), (0, 1))(*args)

    for ours, reference in zip(grads("hybrid"), grads("lax")):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def max_pool_grad_ref(x, window, g):
    """Gradient of a tiling max pool: all of it to each window's first max (numpy)."""
    x, g = np.asarray(x), np.asarray(g)
    dx = np.zeros_like(x)
    wh, ww = window
    for n, i, j, c in itertools.product(*(range(s) for s in g.shape)):
        win = x[n, i * wh : (i + 1) * wh, j * ww : (j + 1) * ww, c]
        p, q = np.unravel_index(np.argmax(win), win.shape)  # argmax: first max
        dx[n, i * wh + p, j * ww + q, c] = g[n, i, j, c]
    return dx


@pytest.mark.parametrize("hw,window", [((4, 6), (2, 2)), ((7, 7), (2, 3)), ((6, 6), (3, 3))])
def test_max_pool_gradient_goes_to_the_first_max_of_ties(hw, window):
    # Few distinct values, so most windows tie; odd sizes leave cells uncovered.
    x = jnp.asarray(RNG.integers(0, 3, size=(2, *hw, 3)), jnp.float32)
    g = rand(*ops.max_pool(x, window).shape)
    dx = jax.grad(lambda x: jnp.sum(ops.max_pool(x, window) * g))(x)
    np.testing.assert_array_equal(dx, max_pool_grad_ref(x, window, g))
    # The same rule as the reduce_window path (XLA's select-and-scatter).
    dims = (1, *window, 1)
    reduce_window = jax.grad(
        lambda x: jnp.sum(lax.reduce_window(x, -jnp.inf, lax.max, dims, dims, "VALID") * g)
    )(x)
    np.testing.assert_array_equal(dx, reduce_window)
    # Forward mode picks the same cells: the JVP is the transpose of the VJP.
    t = rand(*x.shape)
    _, jvp_out = jax.jvp(lambda x: ops.max_pool(x, window), (x,), (t,))
    np.testing.assert_allclose(jnp.sum(jvp_out * g), jnp.sum(dx * t), rtol=1e-5)


def test_avg_pool_same_does_not_count_padded_cells():
    x = jnp.arange(9.0).reshape(3, 3, 1)
    y = ops.avg_pool(x, 2, padding="SAME")[..., 0]
    # Windows: {0,1,3,4}, {2,5}, {6,7}, {8}: padding adds nothing to the count.
    np.testing.assert_allclose(y, [[2.0, 3.5], [6.5, 8.0]])


def test_max_pool_same_ignores_padding_for_negative_inputs():
    x = -jnp.arange(1.0, 10.0).reshape(3, 3, 1)
    np.testing.assert_array_equal(ops.max_pool(x, 2, padding="SAME")[..., 0], [[-1, -3], [-7, -9]])


def test_flatten_is_row_major_hwc_like_keras():
    n, h, w, c = 2, 3, 4, 5
    x = rand(n, h, w, c)
    y = ops.flatten(x)
    assert y.shape == (n, h * w * c)
    for i, j, ch in [(0, 0, 1), (2, 3, 4), (1, 2, 0)]:
        assert y[1, (i * w + j) * c + ch] == x[1, i, j, ch]
    np.testing.assert_array_equal(y, np.asarray(x).reshape(n, -1))


def test_dense_matches_numpy():
    x, k, b = rand(5, 7), rand(7, 3), rand(3)
    np.testing.assert_allclose(
        ops.dense(x, k, b), np.asarray(x, np.float64) @ np.asarray(k, np.float64) + np.asarray(b),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


GRAD_CASES = [
    lambda x, k, low: ops.conv2d(x, k, stride=2, padding="SAME", lowering=low),
    lambda x, k, low: ops.conv2d(x, k, padding=((2, 0), (1, 1)), dilation=2, lowering=low),
    lambda x, k, low: ops.max_pool(ops.conv2d(x, k, lowering=low), 2, padding="SAME"),
    lambda x, k, low: ops.avg_pool(
        ops.relu(ops.conv2d(x, k, lowering=low)), 3, stride=2, padding="SAME"
    ),
    lambda x, k, low: ops.avg_pool(ops.conv2d(x, k, lowering=low), 2),  # Tiling windows.
    lambda x, k, low: ops.dense(ops.flatten(ops.conv2d(x, k, lowering=low)), jnp.ones((60, 3))),
]


def kink_gap(case: int, x: np.ndarray, k: np.ndarray) -> float:
    """How far GRAD_CASES[case]'s data lie from the kinks that finite differences
    cannot cross: the ReLU's inputs from 0, a max-pool window's largest value from
    the next (inf for the smooth cases)."""
    conv = conv2d_ref(x, k)  # Stride 1, SAME: the ReLU's and the max pool's input.
    if case == 3:
        return float(np.abs(conv).min())
    if case == 2:  # 2x2 windows, stride 2, SAME: the 5 columns padded to 6.
        padded = np.pad(conv, ((0, 0), (0, 0), (0, 1), (0, 0)), constant_values=-np.inf)
        windows = padded.reshape(2, 3, 2, 3, 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4)
        top = np.sort(windows, axis=1)
        return float((top[:, -1] - top[:, -2]).min())
    return np.inf


@pytest.mark.parametrize("case", range(len(GRAD_CASES)))
@pytest.mark.parametrize(
    "lowering,modes",
    [
        ("lax", ["fwd", "rev"]),
        ("nhwc_grads", ["rev"]),
        ("im2col", ["fwd", "rev"]),
        ("hybrid", ["fwd", "rev"]),
    ],
)
def test_gradients_match_finite_differences(case, lowering, modes):
    rng = np.random.default_rng(case)  # Every lowering of a case gets the same data,
    x, k = rng.normal(size=(2, 6, 5, 3)), rng.normal(size=(3, 3, 3, 2))
    while kink_gap(case, x, k) < 0.05:  # drawn until steps of ~1e-3 cross no kink.
        x, k = rng.normal(size=(2, 6, 5, 3)), rng.normal(size=(3, 3, 3, 2))
    with jax.enable_x64(True):
        check_grads(
            lambda x, k: GRAD_CASES[case](x, k, lowering), (jnp.asarray(x), jnp.asarray(k)),
            order=2, modes=modes, eps=1e-4,
        )  # fmt: skip


@pytest.mark.parametrize("lowering", ["nhwc_grads", "im2col", "hybrid"])
@pytest.mark.parametrize(
    "stride,padding,dilation", [(1, "SAME", 1), (2, "VALID", 1), ((2, 1), ((0, 2), (1, 0)), 2)]
)
def test_conv2d_gradients_equal_lax_gradients(stride, padding, dilation, lowering):
    x, k = rand(3, 9, 8, 4), rand(3, 2, 4, 5)
    s = (stride, stride) if isinstance(stride, int) else stride
    d = (dilation, dilation)
    pads = resolve_pads(padding, (9, 8), tuple(di * (kk - 1) + 1 for di, kk in zip(d, (3, 2))), s)

    def lax_conv(x, k):
        return lax.conv_general_dilated(
            x, k, s, pads, rhs_dilation=d, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def ours(x, k):
        return ops.conv2d(
            x, k, stride=stride, padding=padding, dilation=dilation, lowering=lowering
        )

    g = rand(*lax_conv(x, k).shape)
    loss = lambda f: lambda x, k: jnp.sum(f(x, k) * g)  # noqa: E731
    ours_dx, ours_dk = jax.grad(loss(ours), (0, 1))(x, k)
    lax_dx, lax_dk = jax.grad(loss(lax_conv), (0, 1))(x, k)
    np.testing.assert_allclose(ours_dx, lax_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_dk, lax_dk, rtol=1e-5, atol=1e-5)


def per_example_net(x_HWC, k1, k2):
    """A small CNN on one example, written with the ops."""
    h = ops.max_pool(ops.relu(ops.conv2d(x_HWC, k1)), 2)
    h = ops.avg_pool(ops.relu(ops.conv2d(h, k2, stride=1, padding="VALID")), 1)
    return ops.dense(ops.flatten(h, batch_dims=0), jnp.ones((2 * 2 * 4, 3)))


def test_vmap_of_per_example_function_equals_batched_call():
    x, k1, k2 = rand(5, 8, 8, 2), rand(3, 3, 2, 3), rand(3, 3, 3, 4)
    vmapped = jax.vmap(per_example_net, in_axes=(0, None, None))(x, k1, k2)
    h = ops.max_pool(ops.relu(ops.conv2d(x, k1)), 2)
    h = ops.avg_pool(ops.relu(ops.conv2d(h, k2, padding="VALID")), 1)
    batched = ops.dense(ops.flatten(h), jnp.ones((16, 3)))
    np.testing.assert_allclose(vmapped, batched, rtol=1e-5, atol=1e-5)


def test_vmap_of_per_example_gradients_equals_one_at_a_time():
    x, k1, k2 = rand(4, 8, 8, 2), rand(3, 3, 2, 3), rand(3, 3, 3, 4)
    grad_fn = jax.grad(lambda k1, x: jnp.sum(per_example_net(x, k1, k2) ** 2))
    vmapped = jax.vmap(grad_fn, in_axes=(None, 0))(k1, x)
    for i in range(4):
        np.testing.assert_allclose(vmapped[i], grad_fn(k1, x[i]), rtol=1e-4, atol=1e-5)


def test_jit_equals_eager():
    x, k1, k2 = rand(8, 8, 2), rand(3, 3, 2, 3), rand(3, 3, 3, 4)
    np.testing.assert_allclose(
        jax.jit(per_example_net)(x, k1, k2), per_example_net(x, k1, k2), rtol=1e-6, atol=1e-6
    )


BAD_CALLS = [
    (
        lambda: ops.conv2d(jnp.ones((4, 4)), jnp.ones((3, 3, 1, 1))),
        ValueError,
        r"x must be NHWC .* got shape \(4, 4\)",
    ),
    (
        lambda: ops.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1))),
        ValueError,
        r"kernel must be HWIO",
    ),
    (
        lambda: ops.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 3, 8))),
        ValueError,
        r"C_in=3 .* C=2",
    ),
    (
        lambda: ops.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 8)), jnp.ones(4)),
        ValueError,
        r"bias must have shape \(8,\)",
    ),
    (
        lambda: ops.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), padding="FULL"),
        ValueError,
        r"padding must be 'SAME', 'VALID'",
    ),
    (
        lambda: ops.conv2d(
            jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), padding=((1, -1), (0, 0))
        ),
        ValueError,
        r"padding must be >= 0",
    ),
    (
        lambda: ops.conv2d(jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1)), padding="VALID"),
        ValueError,
        r"does not fit",
    ),
    (
        lambda: ops.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), stride=0),
        ValueError,
        r"stride must be >= 1",
    ),
    (
        lambda: ops.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), dilation=1.5),
        TypeError,
        r"dilation must be an int or a pair",
    ),
    (
        lambda: ops.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), lowering="fft"),
        ValueError,
        r"lowering must be",
    ),
    (lambda: ops.max_pool(jnp.ones((1, 4, 4, 1)), 0), ValueError, r"max_pool: window must be >= 1"),
    (
        lambda: ops.avg_pool(jnp.ones((1, 4, 4, 1)), (2, 2, 2)),
        TypeError,
        r"avg_pool: window must be an int or a pair",
    ),
    (lambda: ops.max_pool(jnp.ones((1, 4, 4, 1)), 5), ValueError, r"window \(5, 5\) does not fit"),
    (lambda: ops.avg_pool(jnp.ones((4, 4)), 2), ValueError, r"avg_pool: x must be NHWC"),
    (
        lambda: ops.max_pool(jnp.ones((1, 4, 4, 1)), 2, padding="same-ish"),
        ValueError,
        r"max_pool: padding",
    ),
    (
        lambda: ops.dense(jnp.ones((2, 5)), jnp.ones((4, 3))),
        ValueError,
        r"last axis of x \(shape \(2, 5\)\) must equal .* 4",
    ),
    (
        lambda: ops.dense(jnp.ones((2, 4)), jnp.ones((4, 3, 1))),
        ValueError,
        r"kernel must have shape \(in, out\)",
    ),
    (lambda: ops.flatten(jnp.ones(3), batch_dims=2), ValueError, r"at least batch_dims=2 axes"),
]


@pytest.mark.parametrize("call,error,message", BAD_CALLS)
def test_bad_input_raises_a_python_error_naming_the_problem(call, error, message):
    with pytest.raises(error, match=message):
        call()
    with pytest.raises(error, match=message):  # The same under jit: raised while tracing.
        jax.jit(call)()


def test_docstring_examples_run():
    result = doctest.testmod(ops, extraglobs={"jnp": jnp}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 7
    assert result.failed == 0


def test_importing_the_library_loads_neither_tensorflow_nor_tfds():
    imports = "cnnflat_jax, cnnflat_jax.ops, cnnflat_jax.run.trainer"
    assert loaded_by(imports, ("tensorflow", "tensorflow_datasets")) == []


def test_relu_propagates_nan_like_jax_nn_relu():
    x = jnp.array([np.nan, -np.inf, -1.0, -0.0, 0.0, 2.0, np.inf])
    np.testing.assert_array_equal(ops.relu(x), jax.nn.relu(x))
    assert np.isnan(ops.relu(x)[0])
    grads = jax.grad(lambda x: jnp.sum(ops.relu(x)))(jnp.array([-1.0, 0.0, 3.0]))
    assert grads.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "op,args",
    [
        (ops.relu, [(3,)]),
        (ops.flatten, [(2, 3, 3, 1)]),
        (lambda x: ops.max_pool(x, 2), [(1, 4, 4, 1)]),
        (lambda x: ops.avg_pool(x, 2), [(1, 4, 4, 1)]),
        (ops.conv2d, [(1, 4, 4, 1), (3, 3, 1, 2)]),
        (ops.dense, [(2, 3), (3, 4)]),
    ],
)
def test_ops_refuse_complex_inputs(op, args):
    for i in range(len(args)):
        arrays = [jnp.ones(shape, jnp.float32) for shape in args]
        arrays[i] = arrays[i].astype(jnp.complex64)
        with pytest.raises(TypeError, match="must be real, got dtype complex64"):
            op(*arrays)


# global_avg_pool, dropout --------------------------------------------------------


def test_global_avg_pool_matches_numpy_and_its_gradient_is_one_over_hw():
    x = rand(2, 5, 7, 3)
    means = np.asarray(x).mean(axis=(1, 2))
    np.testing.assert_allclose(ops.global_avg_pool(x), means, rtol=1e-6)
    np.testing.assert_allclose(ops.global_avg_pool(x[0]), means[0], rtol=1e-6)
    ints = jnp.arange(12, dtype=jnp.int32).reshape(2, 2, 3)  # Channel c: c, c+3, c+6, c+9.
    np.testing.assert_array_equal(ops.global_avg_pool(ints), [4.5, 5.5, 6.5])
    grad = jax.grad(lambda x: ops.global_avg_pool(x)[1, 2])(x)
    expected = np.zeros(x.shape, np.float32)
    expected[1, :, :, 2] = 1 / 35
    np.testing.assert_allclose(grad, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"global_avg_pool: x must be NHWC"):
        ops.global_avg_pool(jnp.ones((3, 4)))


def test_dropout_zeroes_at_the_rate_scales_the_rest_and_follows_the_key():
    x = jnp.asarray(RNG.uniform(1, 2, size=(200, 100)), jnp.float32)
    key = jax.random.key(3)
    y = np.asarray(ops.dropout(x, 0.3, key))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.7, rtol=1e-6)
    assert abs(1 - kept.mean() - 0.3) < 0.01  # 20,000 draws: ~0.003 standard error.
    np.testing.assert_array_equal(ops.dropout(x, 0.3, key), y)
    assert not np.array_equal(np.asarray(ops.dropout(x, 0.3, jax.random.key(4))), y)
    np.testing.assert_array_equal(ops.dropout(x, 0.0, key), x)
    grad = jax.grad(lambda x: jnp.sum(ops.dropout(x, 0.3, key)))(x)
    np.testing.assert_allclose(grad, kept / 0.7, rtol=1e-6)
    with pytest.raises(ValueError, match=r"dropout: rate must be in \[0, 1\), got 1.0"):
        ops.dropout(x, 1.0, key)


# Where research code puts the ops ---------------------------------------------------


INT_X, INT_K = rand(2, 9, 9, 3), rand(3, 3, 3, 4)


@pytest.mark.parametrize(
    "call",
    [
        lambda i: ops.conv2d(INT_X, INT_K, stride=i(2), dilation=i(1)),
        lambda i: ops.conv2d(INT_X, INT_K, stride=(i(2), i(1)), padding=((i(1), i(0)), (0, 1))),
        lambda i: ops.max_pool(INT_X, i(3), stride=i(2)),
        lambda i: ops.avg_pool(INT_X, (i(2), i(3))),
        lambda i: ops.flatten(INT_X, batch_dims=i(1)),
    ],
)
@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint8])
def test_numpy_integers_are_accepted_wherever_ints_are(call, integer):
    np.testing.assert_array_equal(call(integer), call(int))


DENSE_KERNEL = rand(8 * 8 * 3, 5)
SHARDED_OPS = {
    "conv2d lax": lambda x, k: ops.conv2d(x, k, lowering="lax"),
    "conv2d nhwc_grads": lambda x, k: ops.conv2d(x, k, stride=2, lowering="nhwc_grads"),
    "conv2d im2col": lambda x, k: ops.conv2d(x, k, lowering="im2col"),
    "conv2d auto": lambda x, k: ops.conv2d(x, k, padding="VALID"),
    "relu": lambda x, k: ops.relu(x),
    "max_pool": lambda x, k: ops.max_pool(x, 2),
    "max_pool overlapping": lambda x, k: ops.max_pool(x, 3, stride=2, padding="SAME"),
    "avg_pool": lambda x, k: ops.avg_pool(x, 2),
    "avg_pool same": lambda x, k: ops.avg_pool(x, 3, stride=1, padding="SAME"),
    "global_avg_pool": lambda x, k: ops.global_avg_pool(x),
    "flatten": lambda x, k: ops.flatten(x),
    "dense": lambda x, k: ops.dense(ops.flatten(x), DENSE_KERNEL),
    "dropout": lambda x, k: ops.dropout(x, 0.5, jax.random.key(0)),
}


def _use_mesh(mesh):
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else jax.sharding.use_mesh(mesh)


@pytest.mark.parametrize("mode", ["Explicit", "Auto"])
@pytest.mark.parametrize("name", SHARDED_OPS)
def test_every_op_works_on_a_batch_sharded_input_in_explicit_and_auto_meshes(mode, name):
    op = SHARDED_OPS[name]
    x, kernel = rand(8, 8, 8, 3), rand(3, 3, 3, 4)

    def loss(x, kernel):
        return jnp.sum(op(x, kernel) ** 2)

    expected = jax.jit(op)(x, kernel), jax.jit(jax.grad(loss, (0, 1)))(x, kernel)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, mode),))
    with _use_mesh(mesh):
        sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("data")))
        value = jax.jit(op)(sharded, kernel)
        grads = jax.jit(jax.grad(loss, (0, 1)))(sharded, kernel)
    np.testing.assert_allclose(value, expected[0], rtol=1e-5, atol=1e-5)
    for actual, want in zip(grads, expected[1]):
        np.testing.assert_allclose(actual, want, rtol=1e-4, atol=1e-4)
    assert value.sharding.spec[0] == "data"  # The batch stays split over the devices.
