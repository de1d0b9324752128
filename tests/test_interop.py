"""Porting to and from Keras 3 (JAX backend) and PyTorch, flatten order included."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rounding_close, idx_config, write_idx_dataset

from cnnflat_jax import interop, models, ops, trainer

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
    assert ported.model["conv_features"] == (8, 16)
    assert ported.model["padding"] == padding.upper()
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
    assert ported.softmax
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
    assert_trees_equal(back.params, ported.params)


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
        (
            [kl.Conv2D(4, 3, activation="relu"), kl.Flatten(), kl.Dense(2)],
            r"expected pool but found layer '\w+' \(flatten\)",
        ),
        ([kl.Conv2D(4, 3, activation="tanh", name="c")], r"'c': activation 'tanh'"),
        ([kl.Conv2D(4, 3, strides=2, name="c")], r"'c': strides \(2, 2\)"),
        (
            [kl.Conv2D(4, 3, activation="relu"), kl.MaxPooling2D(2, strides=1, name="p")],
            r"'p': pooling must use strides = pool_size",
        ),
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
        tnn.Dropout(0.5),
        tnn.Linear(16 * side * side, 32),
        tnn.ReLU(),
        tnn.Linear(32, 10),
    ).eval()


def torch_logits(module, images_NCHW):
    with torch.no_grad():
        return module(torch.from_numpy(images_NCHW)).numpy()


@pytest.mark.parametrize("padding,pool", [(1, tnn.MaxPool2d), ("valid", tnn.AvgPool2d)])
def test_torch_cnn_gives_the_same_logits(padding, pool):
    module = torch_cnn(padding, pool)
    images = random_images((1, 28, 28))
    ported = interop.from_torch(module, input_chw=(1, 28, 28))
    assert ported.model["padding"] == ("SAME" if padding == 1 else "VALID")
    logits = np.asarray(ported.apply(images.transpose(0, 2, 3, 1)))
    assert_rounding_close(logits, torch_logits(module, images))


def test_torch_dense_without_the_flatten_permutation_is_wrong():
    module = torch_cnn()
    images = random_images((1, 28, 28))
    ported = interop.from_torch(module, input_chw=(1, 28, 28))
    unpermuted = jax.tree.map(lambda x: x, ported.params)
    unpermuted["Dense_0"]["kernel"] = jnp.asarray(module[8].weight.detach().numpy().T)
    wrong = interop.Ported(ported.model, 10, ported.input_hwc, unpermuted)
    expected = torch_logits(module, images)
    right_error = np.abs(np.asarray(ported.apply(images.transpose(0, 2, 3, 1))) - expected)
    wrong_error = np.abs(np.asarray(wrong.apply(images.transpose(0, 2, 3, 1))) - expected)
    assert right_error.max() <= 1e-5
    assert wrong_error.max() > 1e-2


class TutorialNet(tnn.Module):
    """The PyTorch tutorial style: modules for weights, F.relu and torch.flatten."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = tnn.Conv2d(3, 6, 5)
        self.pool = tnn.MaxPool2d(2, 2)
        self.conv2 = tnn.Conv2d(6, 16, 5)
        self.fc1 = tnn.Linear(16 * 5 * 5, 120)
        self.fc2 = tnn.Linear(120, 10)

    def forward(self, x):
        x = self.pool(torch.nn.functional.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.nn.functional.relu(self.fc1(x)))


def test_traced_torch_module_gives_the_same_logits():
    module = TutorialNet()
    images = random_images((3, 32, 32))
    ported = interop.from_torch(module, input_chw=(3, 32, 32))
    assert ported.model["kernel_size"] == 5 and ported.model["padding"] == "VALID"
    logits = np.asarray(ported.apply(images.transpose(0, 2, 3, 1)))
    assert_rounding_close(logits, torch_logits(module, images))


@pytest.mark.parametrize(
    "fields,input_hwc",
    [
        (dict(name="cnn", conv_features=(4, 6), kernel_size=3), (12, 10, 2)),
        (dict(name="cnn", conv_features=(5,), kernel_size=2, pool="avg"), (9, 9, 1)),
        (dict(name="cnn", padding="VALID", pool_window=3, dense_features=(7, 5)), (20, 20, 1)),
        (dict(name="mlp", dense_features=(9,)), (6, 5, 2)),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_ours_to_torch_and_back_is_exact(fields, input_hwc):
    ported = random_ported(fields, input_hwc)
    module = interop.to_torch(ported)
    images = random_images(input_hwc)
    expected = np.asarray(ported.apply(images))
    assert_rounding_close(torch_logits(module, images.transpose(0, 3, 1, 2)), expected)
    h, w, c = input_hwc
    back = interop.from_torch(module, input_chw=(c, h, w))
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
        ([tnn.Conv2d(1, 4, 3, padding=2)], r"'0': padding \(2, 2\) is neither 0"),
        ([tnn.Conv2d(1, 4, 3), tnn.Sigmoid()], r"'1' \(Sigmoid\) is not supported"),
    ],
)
def test_torch_unsupported_models_name_the_layer(layers, message):
    with pytest.raises(interop.UnsupportedModelError, match=message):
        interop.from_torch(tnn.Sequential(*layers), input_chw=(1, 8, 8))


def test_importing_the_library_imports_neither_framework():
    code = (
        "import sys, cnnflat_jax, cnnflat_jax.interop; "
        "print(sorted(m for m in ('keras', 'torch', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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


@pytest.mark.parametrize("fields", [dict(pool="stride"), dict(permute_flat=True)])
def test_exporting_a_model_the_frameworks_cannot_express_is_refused(fields):
    ported = random_ported(dict(name="cnn", conv_features=(4,), **fields), (8, 8, 1))
    with pytest.raises(interop.UnsupportedModelError, match="export supports pooled CNNs"):
        interop.to_torch(ported)
