"""Porting to and from Keras 3 (JAX backend) and PyTorch, flatten order included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rounding_close, idx_config, loaded_by, write_idx_dataset

from cnnflat_jax.nn import models, ops
from cnnflat_jax.run import trainer
from cnnflat_jax.tools import interop

keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
kl, tnn = keras.layers, torch.nn


def random_images(shape, seed=0):
    return np.random.default_rng(seed).random((4, *shape), dtype=np.float32)


def random_ported(fields, input_hwc, num_classes=10, softmax=False):
    ported = interop.Ported(fields, num_classes, input_hwc, None, softmax)
    params = ported.module().init(jax.random.key(1), jnp.zeros((1, *input_hwc)))["params"]
    # Non-zero biases, so that a bias in the wrong place shows.
    params = jax.tree.map(lambda x: x + 0.1 * jnp.arange(x.size).reshape(x.shape) / x.size, params)
    return interop.Ported(fields, num_classes, input_hwc, params, softmax)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ops.reorder_flat_kernel --------------------------------------------------------


def test_reorder_flat_kernel_matches_both_flatten_orders():
    maps_HWC = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    kernel_chw = np.random.default_rng(1).normal(size=(60, 7)).astype(np.float32)
    torch_style = maps_HWC.transpose(2, 0, 1).reshape(-1) @ kernel_chw  # flatten (c, h, w)
    kernel_hwc = ops.reorder_flat_kernel(kernel_chw, (3, 4, 5), source="chw", target="hwc")
    ours = np.asarray(ops.flatten(maps_HWC, batch_dims=0)) @ np.asarray(kernel_hwc)
    np.testing.assert_allclose(ours, torch_style, rtol=1e-5, atol=1e-5)
    back = ops.reorder_flat_kernel(kernel_hwc, (3, 4, 5), source="hwc", target="chw")
    np.testing.assert_array_equal(np.asarray(back), kernel_chw)


def test_reorder_flat_kernel_by_hand():
    # Map H=1, W=2, C=2: (c, h, w) rows are a, b, A, B; (h, w, c) rows are a, A, b, B.
    rows_chw = jnp.array([[1.0], [2.0], [10.0], [20.0]])
    out = ops.reorder_flat_kernel(rows_chw, (1, 2, 2), source="chw", target="hwc")
    np.testing.assert_array_equal(np.asarray(out)[:, 0], [1.0, 10.0, 2.0, 20.0])


@pytest.mark.parametrize(
    "kernel_shape,map_hwc,source,message",
    [
        ((10, 3), (2, 2, 2), "chw", r"must be \(H \* W \* C, out\) = \(8, out\)"),
        ((8, 3), (2, 2, 2), "cwh", r"source must be one of \('hwc', 'chw'\)"),
        ((8, 3), (2, 4), "chw", r"map_hwc must be \(H, W, C\)"),
    ],
)
def test_reorder_flat_kernel_rejects_bad_input(kernel_shape, map_hwc, source, message):
    with pytest.raises(ValueError, match=message):
        ops.reorder_flat_kernel(jnp.zeros(kernel_shape), map_hwc, source=source, target="hwc")


# Keras --------------------------------------------------------------------------


def keras_cnn(data_format, padding="same", pool=kl.MaxPooling2D, functional=False):
    shape = (28, 28, 1) if data_format == "channels_last" else (1, 28, 28)
    keras.utils.set_random_seed(0)
    layers = [
        kl.Conv2D(8, 3, padding=padding, activation="relu", data_format=data_format),
        pool(2, data_format=data_format),
        kl.Conv2D(16, 3, padding=padding, data_format=data_format),
        kl.ReLU(),
        pool(2, data_format=data_format),
        kl.Flatten(),
        kl.Dropout(0.5),
        kl.Dense(32, activation="relu"),
        kl.Dense(10),
    ]
    return keras_model(shape, layers, functional)


def keras_model(shape, layers, functional=False):
    inputs = keras.Input(shape)
    if not functional:
        return keras.Sequential([inputs, *layers])
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def keras_logits(model, images):
    with jax.numpy_rank_promotion("allow"):  # Keras's own ops broadcast freely.
        return np.asarray(model(images, training=False))


def nhwc(images, data_format):
    return images if data_format == "channels_last" else images.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize(
    "padding,pool,functional",
    [("same", kl.MaxPooling2D, False), ("valid", kl.AveragePooling2D, True)],
)
def test_keras_cnn_gives_the_same_logits(data_format, padding, pool, functional):
    model = keras_cnn(data_format, padding, pool, functional)
    images = random_images(model.inputs[0].shape[1:])
    ported = interop.from_keras(model)
    assert ported.input_hwc == (28, 28, 1)
    conv = "conv:{}:3" + (":padding=valid" if padding == "valid" else "")
    pool_spec = "max_pool:2" if pool is kl.MaxPooling2D else "avg_pool:2"
    assert ported.model == {
        "name": "sequential",
        "layers": (
            conv.format(8), "relu", pool_spec, conv.format(16), "relu", pool_spec,
            "flatten", "dropout:0.5", "dense:32", "relu", "dense:10",
        ),
    }  # fmt: skip
    logits = np.asarray(ported.apply(nhwc(images, data_format)))
    assert_rounding_close(logits, keras_logits(model, images))


def test_keras_channels_first_with_a_channels_last_flatten_is_reordered():
    keras.utils.set_random_seed(0)
    cf = "channels_first"
    model = keras.Sequential(
        [
            keras.Input((3, 12, 10)),
            kl.Conv2D(4, 3, padding="same", activation="relu", data_format=cf),
            kl.MaxPooling2D(2, data_format=cf),
            kl.Flatten(data_format="channels_last"),  # (c, h, w) order
            kl.Dense(5, activation="softmax"),
        ]
    )
    images = random_images((3, 12, 10))
    ported = interop.from_keras(model)
    assert ported.softmax and ported.model["name"] == "cnn"
    probs = jax.nn.softmax(ported.apply(nhwc(images, cf)))
    np.testing.assert_allclose(probs, keras_logits(model, images), rtol=0, atol=1e-6)


def test_keras_mlp_on_raw_pixels():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8, 8, 2)), kl.Flatten(), kl.Dense(16), kl.Activation("relu"), kl.Dense(3)]
    )
    images = random_images((8, 8, 2))
    ported = interop.from_keras(model)
    assert ported.model == {"name": "mlp", "dense_features": (16,)}
    np.testing.assert_allclose(ported.apply(images), keras_logits(model, images), atol=1e-5)


def test_to_keras_and_back_is_exact():
    fields = dict(name="cnn", conv_features=(4, 6), kernel_size=5, pool="avg", pool_window=2)
    ported = random_ported(fields, (16, 16, 3), softmax=True)
    model = interop.to_keras(ported)
    images = random_images((16, 16, 3))
    probs = jax.nn.softmax(ported.apply(images))
    np.testing.assert_allclose(keras_logits(model, images), probs, rtol=0, atol=1e-6)
    back = interop.from_keras(model)
    assert back.softmax and back.input_hwc == (16, 16, 3)
    assert back.model == {**models_defaults(fields), **fields}
    assert_trees_equal(back.params, ported.params)


def keras_simple_mnist_convnet():
    """The keras.io example "Simple MNIST convnet", as published."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            kl.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            kl.MaxPooling2D(pool_size=(2, 2)),
            kl.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            kl.MaxPooling2D(pool_size=(2, 2)),
            kl.Flatten(),
            kl.Dropout(0.5),
            kl.Dense(10, activation="softmax"),
        ]
    )


def keras_gap_head(functional=False):
    keras.utils.set_random_seed(0)
    layers = [
        kl.Conv2D(8, 3, padding="same", activation="relu"),
        kl.MaxPooling2D(2),
        kl.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
        kl.GlobalAveragePooling2D(),
        kl.Dropout(0.2),
        kl.Dense(10),
    ]
    return keras_model((28, 28, 1), layers, functional)


def keras_conv_conv_pool():
    keras.utils.set_random_seed(0)
    layers = [
        kl.Conv2D(6, 3, activation="relu"),
        kl.Conv2D(8, 3, dilation_rate=2, padding="same", activation="relu"),
        kl.MaxPooling2D(3, strides=2, padding="same"),
        kl.AveragePooling2D(2, strides=1),
        kl.Flatten(),
        kl.Dense(5),
        kl.Activation("log_softmax"),
    ]
    return keras_model((20, 18, 3), layers)


@pytest.mark.parametrize(
    "make,last",
    [
        (keras_simple_mnist_convnet, "softmax"),
        (keras_gap_head, None),
        (lambda: keras_gap_head(functional=True), None),
        (keras_conv_conv_pool, "log_softmax"),
    ],
)
def test_keras_models_port_both_ways(make, last):
    model = make()
    shape = tuple(model.inputs[0].shape[1:])
    images = random_images(shape)
    ported = interop.from_keras(model)
    assert ported.model["name"] == "sequential" and ported.input_hwc == shape
    assert ported.model["layers"][-1] == last or last is None
    final = {"softmax": jax.nn.softmax, "log_softmax": jax.nn.log_softmax}.get(last, np.asarray)
    ours = np.asarray(final(ported.apply(images)))
    assert_rounding_close(ours, keras_logits(model, images))
    back = interop.to_keras(ported)
    assert_rounding_close(keras_logits(back, images), ours)
    again = interop.from_keras(back)
    assert again.model == ported.model
    assert_trees_equal(again.params, ported.params)


def test_load_keras_file(tmp_path):
    model = keras_cnn("channels_last")
    path = tmp_path / "cnn.keras"
    model.save(path)
    images = random_images((28, 28, 1))
    logits = interop.load_keras(path).apply(images)
    assert_rounding_close(logits, keras_logits(model, images))


def test_load_keras_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="load_keras: no file at"):
        interop.load_keras(tmp_path / "absent.keras")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="is not a loadable .keras file"):
        interop.load_keras(corrupt)


@pytest.mark.parametrize(
    "layers,message",
    [
        (
            [kl.Conv2D(4, 3), kl.BatchNormalization(name="bn"), kl.Flatten(), kl.Dense(2)],
            r"Keras layer 'bn' \(BatchNormalization\) is not supported; supported layers: "
            r"Conv2D, MaxPooling2D",
        ),
        ([kl.Conv2D(4, 3, activation="tanh", name="c")], r"'c': activation 'tanh'"),
        ([kl.Conv2D(4, 3), kl.Conv2D(4, 3, groups=2, name="c")], r"'c': groups must be 1"),
        ([kl.Conv2D(4, 3, name="c"), kl.Dense(2, name="d")], r"'d': dense needs a vector"),
        ([kl.Conv2D(4, 3, name="c")], r"outputs maps of shape \(6, 6, 4\)"),
    ],
)
def test_keras_unsupported_models_name_the_layer(layers, message):
    model = keras.Sequential([keras.Input((8, 8, 1)), *layers])
    with pytest.raises(interop.UnsupportedModelError, match=message):
        interop.from_keras(model)


# PyTorch ------------------------------------------------------------------------


def torch_cnn(padding=1, pool=tnn.MaxPool2d):
    torch.manual_seed(0)
    side = 7 if padding == 1 else 5  # 28 -> 14 -> 7 (same) or 28 -> 26 -> 13 -> 11 -> 5 (valid)
    return tnn.Sequential(
        tnn.Conv2d(1, 8, 3, padding=padding),
        tnn.ReLU(),
        pool(2),
        tnn.Conv2d(8, 16, 3, padding=padding),
        tnn.ReLU(),
        pool(2),
        tnn.Flatten(),
        tnn.Linear(16 * side * side, 32),
        tnn.ReLU(),
        tnn.Linear(32, 10),
    ).eval()


def torch_logits(module, images_NCHW):
    with torch.no_grad():
        return module.eval()(torch.from_numpy(images_NCHW)).numpy()


@pytest.mark.parametrize("padding,pool", [(1, tnn.MaxPool2d), ("valid", tnn.AvgPool2d)])
def test_torch_cnn_gives_the_same_logits(padding, pool):
    module = torch_cnn(padding, pool)
    images = random_images((1, 28, 28))
    ported = interop.from_torch(module, input_chw=(1, 28, 28))
    assert ported.model["name"] == "cnn"
    assert ported.model["padding"] == ("SAME" if padding == 1 else "VALID")
    logits = np.asarray(ported.apply(images.transpose(0, 2, 3, 1)))
    assert_rounding_close(logits, torch_logits(module, images))


def test_torch_dense_without_the_flatten_permutation_is_wrong():
    module = torch_cnn()
    images = random_images((1, 28, 28))
    ported = interop.from_torch(module, input_chw=(1, 28, 28))
    unpermuted = jax.tree.map(lambda x: x, ported.params)
    unpermuted["Dense_0"]["kernel"] = jnp.asarray(module[7].weight.detach().numpy().T)
    wrong = interop.Ported(ported.model, 10, ported.input_hwc, unpermuted)
    expected = torch_logits(module, images)
    right_error = np.abs(np.asarray(ported.apply(images.transpose(0, 2, 3, 1))) - expected)
    wrong_error = np.abs(np.asarray(wrong.apply(images.transpose(0, 2, 3, 1))) - expected)
    assert right_error.max() <= 1e-5
    assert wrong_error.max() > 1e-2


F = torch.nn.functional


class ExamplesNet(tnn.Module):
    """``Net`` from pytorch/examples ``mnist/main.py``, as published."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = tnn.Conv2d(1, 32, 3, 1)
        self.conv2 = tnn.Conv2d(32, 64, 3, 1)
        self.dropout1 = tnn.Dropout(0.25)
        self.dropout2 = tnn.Dropout(0.5)
        self.fc1 = tnn.Linear(9216, 128)
        self.fc2 = tnn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


EXAMPLES_NET = (
    "conv:32:3:padding=valid", "relu", "conv:64:3:padding=valid", "relu", "max_pool:2",
    "dropout:0.25", "flatten", "dense:128", "relu", "dropout:0.5", "dense:10", "log_softmax",
)  # fmt: skip


def test_the_pytorch_examples_net_ports_both_ways_and_through_a_state_dict_file(tmp_path):
    net = ExamplesNet().eval()
    images = random_images((1, 28, 28))
    expected = torch_logits(net, images)  # log-probabilities
    ported = interop.from_torch(net, input_chw=(1, 28, 28))
    assert ported.model == {"name": "sequential", "layers": EXAMPLES_NET}
    ours = np.asarray(jax.nn.log_softmax(ported.apply(images.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    exported = interop.to_torch(ported)
    np.testing.assert_allclose(torch_logits(exported, images), ours, rtol=0, atol=1e-5)
    path = tmp_path / "mnist_cnn.pt"  # What pytorch/examples saves with --save-model.
    torch.save(net.state_dict(), path)
    loaded = interop.load_torch(path, ported.model, input_chw=(1, 28, 28))
    assert_trees_equal(loaded.params, ported.params)
    back = interop.from_torch(exported, input_chw=(1, 28, 28))
    assert back.model == ported.model
    assert_trees_equal(back.params, ported.params)


class FunctionalNet(tnn.Module):
    """Every functional call from_torch reads, in a traced forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = tnn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = tnn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = tnn.Linear(8, 4)

    def forward(self, x):
        x = F.avg_pool2d(torch.relu(self.conv1(x)), 3, stride=1, padding=1, count_include_pad=False)
        x = F.max_pool2d(F.relu(self.conv2(x)), kernel_size=2)
        x = F.dropout(x, 0.1, training=self.training)
        x = F.adaptive_avg_pool2d(x, 1)
        x = x.view(x.size(0), -1)
        return F.softmax(self.fc(x), dim=1)


def test_functional_calls_port_both_ways():
    net = FunctionalNet().eval()
    images = random_images((3, 16, 12))
    ported = interop.from_torch(net, input_chw=(3, 16, 12))
    assert ported.model["layers"] == (
        "conv:6:3", "relu", "avg_pool:3:stride=1:padding=1", "conv:8:3:stride=2:padding=1",
        "relu", "max_pool:2", "dropout:0.1", "global_avg_pool", "dense:4", "softmax",
    )  # fmt: skip
    ours = np.asarray(jax.nn.softmax(ported.apply(images.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(ours, torch_logits(net, images), rtol=0, atol=1e-6)
    np.testing.assert_allclose(torch_logits(interop.to_torch(ported), images), ours, atol=1e-6)


class TutorialNet(tnn.Module):
    """``Net`` from PyTorch's CIFAR-10 tutorial: modules for weights, F.relu, torch.flatten."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = tnn.Conv2d(3, 6, 5)
        self.pool = tnn.MaxPool2d(2, 2)
        self.conv2 = tnn.Conv2d(6, 16, 5)
        self.fc1 = tnn.Linear(16 * 5 * 5, 120)
        self.fc2 = tnn.Linear(120, 84)
        self.fc3 = tnn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def test_the_cifar10_tutorial_net_ports_both_ways():
    module = TutorialNet()
    images = random_images((3, 32, 32))
    ported = interop.from_torch(module, input_chw=(3, 32, 32))
    assert ported.model == {
        "name": "cnn", "conv_features": (6, 16), "kernel_size": 5, "padding": "VALID",
        "pool": "max", "pool_window": 2, "dense_features": (120, 84),
    }  # fmt: skip
    logits = np.asarray(ported.apply(images.transpose(0, 2, 3, 1)))
    assert_rounding_close(logits, torch_logits(module, images))
    assert_rounding_close(torch_logits(interop.to_torch(ported), images), logits)


def torch_gap_head():
    torch.manual_seed(0)
    return tnn.Sequential(
        tnn.Conv2d(1, 8, 3, padding="same"), tnn.ReLU(), tnn.Conv2d(8, 8, 3), tnn.ReLU(),
        tnn.MaxPool2d(2), tnn.Conv2d(8, 16, 3, padding=1), tnn.ReLU(),
        tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Dropout(0.3), tnn.Linear(16, 10),
        tnn.LogSoftmax(dim=1),
    )  # fmt: skip


def test_a_torch_global_average_pooling_head_ports_both_ways():
    module = torch_gap_head().eval()
    images = random_images((1, 28, 28))
    ported = interop.from_torch(module, input_chw=(1, 28, 28))
    assert ported.model["layers"] == (
        "conv:8:3", "relu", "conv:8:3:padding=valid", "relu", "max_pool:2", "conv:16:3", "relu",
        "global_avg_pool", "dropout:0.3", "dense:10", "log_softmax",
    )  # fmt: skip
    ours = np.asarray(jax.nn.log_softmax(ported.apply(images.transpose(0, 2, 3, 1))))
    assert_rounding_close(ours, torch_logits(module, images))
    assert_rounding_close(torch_logits(interop.to_torch(ported), images), ours)
    assert_rounding_close(
        keras_logits(interop.to_keras(ported), images.transpose(0, 2, 3, 1)), ours
    )


@pytest.mark.parametrize(
    "fields,input_hwc",
    [
        (dict(name="cnn", conv_features=(4, 6), kernel_size=3), (12, 10, 2)),
        (dict(name="cnn", conv_features=(5,), kernel_size=2, pool="avg"), (9, 9, 1)),
        (dict(name="cnn", padding="VALID", pool_window=3, dense_features=(7, 5)), (20, 20, 1)),
        (dict(name="cnn", conv_features=(4, 6), pool="stride"), (12, 11, 2)),
        (dict(name="mlp", dense_features=(9,)), (6, 5, 2)),
        (dict(name="sequential", layers=("conv:4:3:stride=2", "relu", "conv:5:2:stride=2",
                                         "global_avg_pool", "dense:3")), (10, 9, 1)),
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_ours_to_torch_and_back_is_exact(fields, input_hwc):
    ported = random_ported(fields, input_hwc)
    module = interop.to_torch(ported)
    images = random_images(input_hwc)
    expected = np.asarray(ported.apply(images))
    assert_rounding_close(torch_logits(module, images.transpose(0, 3, 1, 2)), expected)
    h, w, c = input_hwc
    back = interop.from_torch(module, input_chw=(c, h, w))
    if fields["name"] == "sequential":
        assert back.model == fields
    else:
        assert back.model == {**models_defaults(fields), **fields}
    assert_trees_equal(back.params, ported.params)


def models_defaults(fields):
    module = models.create_model(fields["name"], 1)
    keys = ("conv_features", "kernel_size", "padding", "pool", "pool_window", "dense_features")
    return {k: getattr(module, k) for k in keys if hasattr(module, k)}


def test_load_torch_state_dict_file(tmp_path):
    module = torch_cnn()
    path = tmp_path / "cnn.pt"
    torch.save(module.state_dict(), path)
    description = dict(name="cnn", conv_features=(8, 16), dense_features=(32,))
    ported = interop.load_torch(path, description, input_chw=(1, 28, 28))
    images = random_images((1, 28, 28))
    logits = np.asarray(ported.apply(images.transpose(0, 2, 3, 1)))
    assert_rounding_close(logits, torch_logits(module, images))
    with pytest.raises(interop.UnsupportedModelError, match=r"weighted layers are \['conv:8:3'"):
        interop.load_torch(path, dict(description, conv_features=(8,)), input_chw=(1, 28, 28))
    with pytest.raises(interop.UnsupportedModelError, match=r"says conv_features=\(8, 32\)"):
        interop.load_torch(path, dict(description, conv_features=(8, 32)), input_chw=(1, 28, 28))


def test_load_torch_refuses_pickled_modules_and_missing_files(tmp_path):
    path = tmp_path / "whole_module.pt"
    torch.save(torch_cnn(), path)  # A pickled nn.Module, not a state_dict.
    with pytest.raises(ValueError, match="does not load with weights_only=True"):
        interop.load_torch(path, {"name": "cnn"}, input_chw=(1, 28, 28))
    with pytest.raises(FileNotFoundError, match="load_torch: no file at"):
        interop.load_torch(tmp_path / "absent.pt", {"name": "cnn"}, input_chw=(1, 28, 28))


@pytest.mark.parametrize(
    "layers,message",
    [
        (
            [tnn.Conv2d(1, 4, 3), tnn.BatchNorm2d(4), tnn.Flatten(), tnn.LazyLinear(2)],
            r"PyTorch layer '1' \(BatchNorm2d\) is not supported; supported layers: Conv2d",
        ),
        ([tnn.Conv2d(1, 4, 3), tnn.Sigmoid()], r"'1' \(Sigmoid\) is not supported"),
        ([tnn.Conv2d(1, 4, 3, groups=1, padding_mode="reflect")], r"'0': groups must be 1"),
        ([tnn.AdaptiveAvgPool2d(2)], r"'0': adaptive average pooling is supported to size 1"),
        ([tnn.AvgPool2d(3, 1, padding=1)], r"'0': pooling with .*count_include_pad=True"),
        ([tnn.MaxPool2d(2, ceil_mode=True)], r"'0': pooling with ceil_mode"),
        ([tnn.Flatten(), tnn.Conv2d(1, 4, 3)], r"layer '1': conv needs maps"),
    ],
)
def test_torch_unsupported_models_name_the_layer(layers, message):
    with pytest.raises(interop.UnsupportedModelError, match=message):
        interop.from_torch(tnn.Sequential(*layers), input_chw=(1, 8, 8))


def test_importing_the_library_imports_neither_framework():
    assert loaded_by("cnnflat_jax, cnnflat_jax.interop", ("keras", "torch", "tensorflow")) == []


def test_a_model_trained_here_serves_in_pytorch_and_keras(tmp_path):
    data = write_idx_dataset(tmp_path / "data", size=8)
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(idx_config(data), str(workdir))
    ported = interop.from_workdir(workdir, input_hwc=(8, 8, 1), num_classes=3)
    images = random_images((8, 8, 1))
    logits = np.asarray(ported.apply(images))
    np.testing.assert_allclose(
        torch_logits(interop.to_torch(ported), images.transpose(0, 3, 1, 2)), logits, atol=1e-5
    )
    np.testing.assert_allclose(keras_logits(interop.to_keras(ported), images), logits, atol=1e-5)


def test_exporting_a_layer_the_frameworks_lack_is_refused():
    ported = random_ported(dict(name="cnn", conv_features=(4,), permute_flat=True), (8, 8, 1))
    with pytest.raises(interop.UnsupportedModelError, match="the 'permute' layer"):
        interop.to_torch(ported)
    with pytest.raises(interop.UnsupportedModelError, match="the 'permute' layer"):
        interop.to_keras(ported)
