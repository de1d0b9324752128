"""Model shapes, parameter counts and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnflat_jax.nn import models, ops


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
        ("resnet", {}, r"unknown model 'resnet'; choose one of \['cnn', 'mlp', 'sequential'\]"),
        ("cnn", {"conv_feature": (8,)}, r"no field\(s\) \['conv_feature'\]"),
        ("mlp", {"pool": "max"}, r"model 'mlp' has no field\(s\) \['pool'\]"),
        ("cnn", {"pool": "median"}, r"unknown pool 'median'"),
        ("cnn", {"padding": "same"}, r"unknown padding 'same'; choose one of \('SAME', 'VALID'\)"),
    ],
)
def test_create_model_rejects_bad_names(name, fields, message):
    with pytest.raises(ValueError, match=message):
        models.create_model(name, 10, **fields)


# Sequential ------------------------------------------------------------------

PYTORCH_NET = (
    "conv:32:3:padding=valid", "relu", "conv:64:3:padding=valid", "relu", "max_pool:2",
    "dropout:0.25", "flatten", "dense:128", "relu", "dropout:0.5", "dense:10", "log_softmax",
)  # fmt: skip


def test_the_pytorch_examples_net_has_its_parameter_count():
    conv1, conv2 = 3 * 3 * 1 * 32 + 32, 3 * 3 * 32 * 64 + 64
    fc1 = (12 * 12 * 64) * 128 + 128  # 28 -> 26 -> 24 -> pooled 12; the 9216 is not written.
    fc2 = 128 * 10 + 10
    params = init(models.Sequential(PYTORCH_NET), (28, 28, 1))
    assert count(params) == conv1 + conv2 + fc1 + fc2 == 1_199_882
    assert params["Dense_0"]["kernel"].shape == (9216, 128)


def test_the_cnn_preset_is_its_spec_run_by_sequential():
    cnn = models.CNN()
    assert cnn.specs() == (
        "conv:32:3", "relu", "max_pool:2", "conv:64:3", "relu", "max_pool:2",
        "flatten", "dense:256", "relu", "dense:10",
    )  # fmt: skip
    params = init(cnn, (28, 28, 1))
    assert count(params) == 824_458
    x = jax.random.uniform(jax.random.key(2), (3, 28, 28, 1))
    expected = cnn.apply({"params": params}, x)
    actual = models.Sequential(cnn.specs()).apply({"params": params}, x)
    np.testing.assert_array_equal(actual, expected)
    assert jax.tree.structure(init(models.Sequential(cnn.specs()), (28, 28, 1))) == (
        jax.tree.structure(params)
    )


@pytest.mark.parametrize(
    "fields,specs",
    [
        ({"pool": "stride"}, ("conv:4:3:stride=2", "relu")),
        ({"permute_flat": True}, ("conv:4:3", "relu", "max_pool:2", "flatten", "permute")),
        ({"padding": "VALID", "pool": "avg"}, ("conv:4:3:padding=valid", "relu", "avg_pool:2")),
    ],
)
def test_cnn_experiments_are_specs(fields, specs):
    cnn = models.CNN(num_classes=5, conv_features=(4,), dense_features=(), **fields)
    tail = () if "permute" in specs else ("flatten",)
    assert cnn.specs() == (*specs, *tail, "dense:5")


def test_sequential_equals_the_ops_composed_by_hand():
    specs = (
        "conv:4:3:stride=2:padding=1", "relu", "conv:6:2x3:dilation=2", "relu",
        "avg_pool:3:stride=1:padding=same", "max_pool:2", "global_avg_pool", "dense:5",
    )  # fmt: skip
    model = models.Sequential(specs)
    x = jax.random.normal(jax.random.key(1), (2, 15, 13, 3))
    params = model.init(jax.random.key(0), x)["params"]
    c0, c1, d = params["Conv2D_0"], params["Conv2D_1"], params["Dense_0"]
    h = ops.relu(ops.conv2d(x, c0["kernel"], c0["bias"], stride=2, padding=((1, 1), (1, 1))))
    h = ops.relu(ops.conv2d(h, c1["kernel"], c1["bias"], dilation=2))
    h = ops.max_pool(ops.avg_pool(h, 3, stride=1, padding="SAME"), 2)
    expected = ops.dense(ops.global_avg_pool(h), d["kernel"], d["bias"])
    assert c1["kernel"].shape == (2, 3, 4, 6)
    np.testing.assert_array_equal(model.apply({"params": params}, x), expected)


def test_every_layer_sows_its_output():
    model = models.Sequential(PYTORCH_NET)
    x = jnp.ones((2, 28, 28, 1))
    params = init(model, (28, 28, 1))
    logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
    sown = state["intermediates"]
    assert list(sown) == [f"layer{i}_{spec.split(':')[0]}" for i, spec in enumerate(PYTORCH_NET)]
    shapes = [value[0].shape for value in sown.values()]
    assert shapes[:7] == [(2, 26, 26, 32)] * 2 + [(2, 24, 24, 64)] * 2 + [(2, 12, 12, 64)] * 2 + [
        (2, 9216)
    ]
    np.testing.assert_array_equal(sown["layer11_log_softmax"][0], logits)  # apply gives logits.


def test_dropout_is_off_without_a_key_and_keyed_with_one():
    specs = ("flatten", "dense:64", "relu", "dropout:0.5", "dense:3")
    model = models.Sequential(specs)
    x = jax.random.normal(jax.random.key(1), (4, 5, 5, 1))
    params = model.init(jax.random.key(0), x)["params"]
    plain = models.Sequential(tuple(s for s in specs if not s.startswith("dropout")))
    off = model.apply({"params": params}, x)
    np.testing.assert_array_equal(off, plain.apply({"params": params}, x))

    def on(seed):
        return model.apply({"params": params}, x, rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(on(7), on(7))
    assert not np.allclose(on(7), on(8))
    assert not np.allclose(on(7), off)
    # By hand: the dense layers around ops.dropout with the key Flax derives.
    _, state = model.apply(
        {"params": params}, x, rngs={"dropout": jax.random.key(7)}, mutable=["intermediates"]
    )
    dropped = state["intermediates"]["layer3_dropout"][0]
    kept = np.asarray(state["intermediates"]["layer2_relu"][0])
    nonzero = np.asarray(dropped) != 0
    np.testing.assert_allclose(np.asarray(dropped)[nonzero], kept[nonzero] / 0.5, rtol=1e-6)
    assert 0.3 < 1 - nonzero[kept > 0].mean() < 0.7  # About half of the live units dropped.


POOLS_TO_NOTHING = ("conv:8:3", *["max_pool:2"] * 4, "flatten", "dense:2")


@pytest.mark.parametrize(
    "specs,message",
    [
        (
            ("conv:8:9:padding=valid", "flatten", "dense:2"),
            r"layer 0 'conv:8:9:padding=valid': conv2d: dilated kernel \(9, 9\) does not fit",
        ),
        (POOLS_TO_NOTHING, r"layer 4 'max_pool:2': max_pool: window \(2, 2\) does not fit"),
        (("flatten", "dense:2", "conv:3:3"), r"layer 2 'conv:3:3': conv needs maps"),
    ],
)
def test_a_spec_that_does_not_fit_the_input_names_the_layer(specs, message):
    with pytest.raises(ValueError, match=message):
        init(models.Sequential(specs), (8, 8, 1))


def test_layer_specs_are_a_sequentials_own_and_a_presets_written_out():
    cnn = models.create_model("cnn", 10)
    assert models.layer_specs(cnn) == (
        "conv:32:3", "relu", "max_pool:2", "conv:64:3", "relu", "max_pool:2", "flatten",
        "dense:256", "relu", "dense:10",
    )  # fmt: skip
    mlp = models.create_model("mlp", 10, dense_features=(64,))
    assert models.layer_specs(mlp) == ("flatten", "dense:64", "relu", "dense:10")
    specs = ["conv:4:3", "relu", "global_avg_pool", "dense:3"]
    assert models.layer_specs(models.Sequential(layers=specs)) == tuple(specs)
