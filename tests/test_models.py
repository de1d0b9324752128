"""Model shapes, parameter counts and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnflat_jax import models, ops


def init(model, shape):
    return model.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]


def count(params):
    return sum(x.size for x in jax.tree.leaves(params))


def test_default_cnn_parameter_count_on_28x28x1():
    conv1 = 3 * 3 * 1 * 32 + 32
    conv2 = 3 * 3 * 32 * 64 + 64
    dense1 = (7 * 7 * 64) * 256 + 256  # 28 -> 14 -> 7 after two 2x2 pools.
    dense2 = 256 * 10 + 10
    assert count(init(models.CNN(), (28, 28, 1))) == conv1 + conv2 + dense1 + dense2 == 824_458


@pytest.mark.parametrize(
    "shape,fields,flat",
    [
        ((32, 32, 3), {}, 8 * 8 * 64),
        ((28, 28, 1), {"pool_window": 3}, 3 * 3 * 64),  # 28 -> 9 -> 3
        ((28, 28, 1), {"conv_features": (16, 32, 8)}, 3 * 3 * 8),  # 28 -> 14 -> 7 -> 3
        ((29, 30, 2), {"pool": "avg"}, 7 * 7 * 64),
        ((28, 28, 1), {"padding": "VALID"}, 5 * 5 * 64),  # 28 -> 26 -> 13 -> 11 -> 5
    ],
)
def test_flatten_width_follows_input_shape(shape, fields, flat):
    model = models.create_model("cnn", 5, **fields)
    params = init(model, shape)
    assert params["Dense_0"]["kernel"].shape == (flat, 256)
    assert model.apply({"params": params}, jnp.zeros((3, *shape))).shape == (3, 5)


def test_cnn_equals_the_ops_composed_by_hand():
    model = models.CNN(num_classes=4, conv_features=(3,), dense_features=(6,), pool="avg")
    params = init(model, (8, 8, 2))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    c, d0, d1 = params["Conv2D_0"], params["Dense_0"], params["Dense_1"]
    h = ops.avg_pool(ops.relu(ops.conv2d(x, c["kernel"], c["bias"])), 2)
    h = ops.relu(ops.dense(ops.flatten(h), d0["kernel"], d0["bias"]))
    expected = ops.dense(h, d1["kernel"], d1["bias"])
    np.testing.assert_array_equal(model.apply({"params": params}, x), expected)


def test_mlp_parameter_count():
    params = init(models.create_model("mlp", 10, dense_features=(100,)), (28, 28, 1))
    assert count(params) == 784 * 100 + 100 + 100 * 10 + 10


@pytest.mark.parametrize(
    "name,fields,message",
    [
        ("resnet", {}, r"unknown model 'resnet'; choose one of \['cnn', 'mlp'\]"),
        ("cnn", {"conv_feature": (8,)}, r"no field\(s\) \['conv_feature'\]"),
        ("mlp", {"pool": "max"}, r"model 'mlp' has no field\(s\) \['pool'\]"),
        ("cnn", {"pool": "median"}, r"unknown pool 'median'"),
        ("cnn", {"padding": "same"}, r"unknown padding 'same'; choose one of \('SAME', 'VALID'\)"),
    ],
)
def test_create_model_rejects_bad_names(name, fields, message):
    with pytest.raises(ValueError, match=message):
        models.create_model(name, 10, **fields)
