"""Keras 3 models to and from cnnflat_jax (see ``cnnflat_jax.interop``)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cnnflat_jax.nn import layers
from cnnflat_jax.tools.interop.ported import (
    ZERO_PAD,
    NeutralLayer,
    Ported,
    UnsupportedModelError,
    assemble,
    layers_with_inputs,
    require,
)

SUPPORTED_KERAS = (
    "Conv2D, MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, Flatten, Dense, ReLU, "
    "Activation('relu' | 'softmax' | 'log_softmax' | 'linear'), Softmax, Dropout, ZeroPadding2D "
    "(before a Conv2D)"
)


def _keras_weights(layer, spec: layers.Layer) -> NeutralLayer:
    weights = layer.get_weights()
    if len(weights) == 1:  # use_bias=False
        weights.append(np.zeros(weights[0].shape[-1], weights[0].dtype))
    return NeutralLayer(spec, layer.name, weights[0], weights[1])


def _keras_activation(layer, activation: str) -> list[NeutralLayer]:
    if activation in ("linear", None):
        return []
    if activation in ("relu", *layers.FINAL_KINDS):
        return [NeutralLayer(layers.Layer(activation), f"{layer.name} (activation)")]
    raise UnsupportedModelError(
        f"Keras layer {layer.name!r}: activation {activation!r} is not supported; "
        "use 'relu', or 'softmax'/'log_softmax' on the last layer"
    )


def _keras_layer(layer, keras) -> tuple[list[NeutralLayer], str | None]:
    """A Keras layer as neutral layers, and its data_format if it has one."""
    config = layer.get_config()
    kl = keras.layers
    if isinstance(layer, kl.Conv2D):
        if config.get("groups", 1) != 1:
            raise UnsupportedModelError(f"Keras layer {layer.name!r}: groups must be 1")
        spec = layers.Layer(
            "conv", config["filters"], tuple(config["kernel_size"]), tuple(config["strides"]),
            config["padding"].upper(), tuple(config["dilation_rate"]),
        )  # fmt: skip
        conv = _keras_weights(layer, spec)
        return [conv, *_keras_activation(layer, config["activation"])], config["data_format"]
    if isinstance(layer, kl.ZeroPadding2D):
        padding = tuple(map(tuple, config["padding"]))
        return [NeutralLayer(layers.Layer(ZERO_PAD, padding=padding), layer.name)], config[
            "data_format"
        ]
    if isinstance(layer, (kl.MaxPooling2D, kl.AveragePooling2D)):
        window = tuple(config["pool_size"])
        kind = "max_pool" if isinstance(layer, kl.MaxPooling2D) else "avg_pool"
        stride = tuple(config["strides"] or window)
        spec = layers.Layer(kind, kernel=window, stride=stride, padding=config["padding"].upper())
        return [NeutralLayer(spec, layer.name)], config["data_format"]
    if isinstance(layer, kl.GlobalAveragePooling2D):
        if config.get("keepdims"):
            raise UnsupportedModelError(f"Keras layer {layer.name!r}: keepdims must be False")
        return [NeutralLayer(layers.Layer("global_avg_pool"), layer.name)], config["data_format"]
    if isinstance(layer, kl.Flatten):
        return [NeutralLayer(layers.Layer("flatten"), layer.name)], config["data_format"]
    if isinstance(layer, kl.Dense):
        dense = _keras_weights(layer, layers.Layer("dense", config["units"]))
        return [dense, *_keras_activation(layer, config["activation"])], None
    if isinstance(layer, kl.ReLU):
        if config["max_value"] is not None or config["negative_slope"] or config["threshold"]:
            raise UnsupportedModelError(
                f"Keras layer {layer.name!r}: only a plain ReLU (no max_value, "
                "negative_slope or threshold) is supported"
            )
        return [NeutralLayer(layers.Layer("relu"), layer.name)], None
    if isinstance(layer, kl.Activation):
        return _keras_activation(layer, config["activation"]), None
    if isinstance(layer, kl.Softmax):
        return [NeutralLayer(layers.Layer("softmax"), layer.name)], None
    if isinstance(layer, kl.Dropout):
        return [NeutralLayer(layers.Layer("dropout", rate=float(config["rate"])), layer.name)], None
    raise UnsupportedModelError(
        f"Keras layer {layer.name!r} ({type(layer).__name__}) is not supported; "
        f"supported layers: {SUPPORTED_KERAS}"
    )


def from_keras(model) -> Ported:
    """Our model and parameters from a built Keras 3 ``Sequential`` or functional chain.

    Works in either ``data_format``. With channels_first layers the Keras
    input is ``(C, H, W)``; ours stays NHWC, so transpose images with
    ``images.transpose(0, 2, 3, 1)`` before ``Ported.apply``.

    Raises:
      UnsupportedModelError: naming the first layer cnnflat_jax cannot express.
    """
    keras = require("keras", "from_keras")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError("from_keras: the model must have one input and one output")
    chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not isinstance(model, keras.Sequential):  # A Sequential is a chain by construction.
        for previous, layer in zip([model.inputs[0], *(x.output for x in chain)], chain):
            if layer.input is not previous:
                raise UnsupportedModelError(
                    f"from_keras: layer {layer.name!r} does not take the previous layer's "
                    "output; only a plain chain of layers is supported"
                )
    neutral, maps_formats, flatten_format = [], set(), None
    for layer in chain:
        neutral_layers, data_format = _keras_layer(layer, keras)
        if isinstance(layer, keras.layers.Flatten):
            flatten_format = data_format
        elif data_format is not None:
            maps_formats.add(data_format)
        neutral.extend(neutral_layers)
    if len(maps_formats) > 1:
        raise UnsupportedModelError("from_keras: the layers mix channels_first and channels_last")
    maps_format = maps_formats.pop() if maps_formats else flatten_format or "channels_last"
    if (maps_format, flatten_format) == ("channels_last", "channels_first"):
        raise UnsupportedModelError(
            "from_keras: a channels_first Flatten after channels_last maps scrambles them"
        )
    order = "chw" if (maps_format, flatten_format) == ("channels_first", "channels_last") else "hwc"
    neutral = [
        dataclasses.replace(x, order=order) if x.spec.kind == "flatten" else x for x in neutral
    ]
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3:
        raise UnsupportedModelError(f"from_keras: the input must be an image, got shape {shape}")
    input_hwc = (*shape[1:], shape[0]) if maps_format == "channels_first" else shape
    return assemble(neutral, input_hwc, "from_keras")


def load_keras(path: str | os.PathLike) -> Ported:
    """``from_keras`` of a ``.keras`` file, loaded in Keras's safe mode."""
    keras = require("keras", "load_keras")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_keras: no file at {os.fspath(path)!r}")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:
        raise ValueError(
            f"load_keras: {os.fspath(path)!r} is not a loadable .keras file: {e}"
        ) from None
    return from_keras(model)


def to_keras(ported: Ported):
    """A channels_last ``keras.Sequential`` with ``ported``'s weights.

    Its input is ``(H, W, C)``; a final softmax or log-softmax is kept.
    """
    keras = require("keras", "to_keras")
    kl = keras.layers
    model_layers, weights = [kl.Input(ported.input_hwc)], {}
    for layer, _ in layers_with_inputs(ported):
        spec = layer.spec
        if spec.kind == "conv":
            padding = spec.padding
            if not isinstance(padding, str):
                model_layers.append(kl.ZeroPadding2D(padding))
                padding = "VALID"
            new = kl.Conv2D(
                spec.features, spec.kernel, strides=spec.stride or 1, padding=padding.lower(),
                dilation_rate=spec.dilation,
            )  # fmt: skip
        elif spec.kind in ("max_pool", "avg_pool"):
            if not isinstance(spec.padding, str):
                raise UnsupportedModelError(
                    f"to_keras: layer {layer.name!r}: Keras pools pad only 'same' or 'valid'"
                )
            pool = kl.MaxPooling2D if spec.kind == "max_pool" else kl.AveragePooling2D
            new = pool(spec.kernel, strides=spec.stride, padding=spec.padding.lower())
        elif spec.kind == "dense":
            new = kl.Dense(spec.features)
        elif spec.kind == "dropout":
            new = kl.Dropout(spec.rate)
        elif spec.kind == "log_softmax":
            new = kl.Activation("log_softmax")
        else:
            new = {
                "relu": kl.ReLU,
                "flatten": kl.Flatten,
                "global_avg_pool": kl.GlobalAveragePooling2D,
                "softmax": kl.Softmax,
            }[spec.kind]()
        if layer.kernel is not None:
            weights[id(new)] = [layer.kernel, layer.bias]
        model_layers.append(new)
    model = keras.Sequential(model_layers)
    for new in model.layers:
        if id(new) in weights:
            new.set_weights(weights[id(new)])
    return model
