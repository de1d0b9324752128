"""Ports models between cnnflat_jax, Keras 3 and PyTorch, flatten order included.

    from cnnflat_jax import interop

    ported = interop.load_keras("model.keras")    # or from_keras(keras_model)
    ported = interop.from_torch(torch_module, input_chw=(1, 28, 28))
    logits = ported.apply(images_NHWC)             # our models take NHWC
    keras_model = interop.to_keras(ported)
    torch_model = interop.to_torch(ported)         # .state_dict() to save

Any chain of the layers that ``models.Sequential`` runs ports both ways:
convolutions (stride, dilation, same/valid/explicit padding), ReLU, max and
average pooling (window, stride, padding), global average pooling, flatten,
dense, dropout, and a final softmax or log-softmax. A model that matches the
``cnn`` or ``mlp`` preset comes back as that preset's fields; any other as
``{"name": "sequential", "layers": (...)}``.

Every weight moves by an exact transpose or permutation:

- conv kernels: Keras HWIO is ours; PyTorch OIHW -> HWIO.
- dense kernels: Keras ``(in, out)`` is ours; PyTorch ``(out, in)`` -> ``(in, out)``.
- the first dense kernel after the flatten: PyTorch flattens NCHW maps in
  ``(c, h, w)`` order, and so does Keras when channels_first maps meet a
  channels_last ``Flatten``; ours is ``(h, w, c)``, so its rows are reordered
  with ``ops.reorder_flat_kernel``. Forgetting this step is the classic
  porting bug: the network runs and predicts garbage.

Keras and PyTorch are imported only by the functions that use them, so
``import cnnflat_jax.interop`` needs neither. Files are read without
unpickling arbitrary objects: Keras's ``safe_mode`` and
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnflat_jax import checkpoints, layers, models, ops

SUPPORTED_KERAS = (
    "Conv2D, MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, Flatten, Dense, ReLU, "
    "Activation('relu' | 'softmax' | 'log_softmax' | 'linear'), Softmax, Dropout, ZeroPadding2D "
    "(before a Conv2D)"
)
SUPPORTED_TORCH = (
    "Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Linear, ReLU, Dropout, "
    "Softmax, LogSoftmax, Identity; in forward also F.relu, F.max_pool2d, F.avg_pool2d, "
    "F.adaptive_avg_pool2d(x, 1), F.dropout, torch.flatten(x, 1), x.view(n, -1), "
    "F.softmax and F.log_softmax"
)


class UnsupportedModelError(ValueError):
    """The source model has a layer or a structure that cnnflat_jax lacks."""


@dataclasses.dataclass(frozen=True)
class Ported:
    """A model in cnnflat_jax terms.

    Attributes:
      model: ``models.create_model`` fields plus "name", as ``config.model``.
      num_classes: the size of the output.
      input_hwc: the input shape ``(H, W, C)``; our models take NHWC images.
      params: the parameter tree (``variables["params"]``).
      softmax: whether a ``cnn``/``mlp`` preset ended with a softmax in the
        source (a ``sequential`` model records it in its layers). ``apply``
        returns the logits before it either way.
    """

    model: Mapping[str, Any]
    num_classes: int
    input_hwc: tuple[int, int, int]
    params: Any
    softmax: bool = False

    def module(self) -> nn.Module:
        return models.from_fields(self.model, self.num_classes)

    def apply(self, images_NHWC: jax.Array) -> jax.Array:
        """Logits for a batch of NHWC images."""
        return self.module().apply({"params": self.params}, images_NHWC)

    def specs(self) -> tuple[str, ...]:
        """The model as layer specs, the final softmax (if any) included."""
        module = self.module()
        specs = tuple(module.layers if isinstance(module, models.Sequential) else module.specs())
        if self.softmax and specs[-1] not in layers.FINAL_KINDS:
            specs += ("softmax",)
        return specs


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One layer, framework-neutral: its spec, weights in our layouts, a name for errors."""

    spec: layers.Layer
    name: str
    kernel: np.ndarray | None = None  # conv HWIO; dense (in, out)
    bias: np.ndarray | None = None
    order: str = "hwc"  # flatten: the order the source flattens maps in (hwc | chw)


def _require(module: str, user: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"interop.{user} needs {module}: pip install {module}") from None


def _input_shapes(module: nn.Module, input_hwc: Sequence[int]) -> tuple[Any, list[tuple]]:
    """``module``'s parameter shapes and the input shape (no batch) of each of its layers."""
    x = jax.ShapeDtypeStruct((1, *input_hwc), jnp.float32)
    init = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, mutable=True), x)
    outputs = [value[0].shape[1:] for _, value in models.sown_layers(init["intermediates"])]
    return init["params"], [tuple(input_hwc), *outputs[:-1]]


def _preset(specs: tuple[str, ...], num_classes: int) -> dict[str, Any] | None:
    """The ``cnn`` or ``mlp`` fields whose specs are ``specs``, if there are such."""
    parsed = layers.parse(specs)
    convs = [layer for layer in parsed if layer.kind == "conv"]
    pools = [layer for layer in parsed if layer.kind.endswith("_pool")]
    fields: dict[str, Any] = {"name": "cnn" if convs else "mlp"}
    if convs:
        fields.update(
            conv_features=tuple(layer.features for layer in convs),
            kernel_size=convs[0].kernel[0],
            padding=convs[0].padding if isinstance(convs[0].padding, str) else "",
            pool=pools[0].kind.removesuffix("_pool") if pools else "stride",
            pool_window=pools[0].kernel[0] if pools else (convs[0].stride or (2,))[0],
        )
    dense = [layer.features for layer in parsed if layer.kind == "dense"]
    fields["dense_features"] = tuple(dense[:-1])
    try:
        preset = models.from_fields(fields, num_classes)
    except ValueError:
        return None
    return fields if preset.specs() == specs else None


# A zero-padding layer (Keras ZeroPadding2D, PyTorch ZeroPad2d) before a conv:
# not a layer of ours, but the conv's explicit padding.
_ZERO_PAD = "zero_pad"


def _merge_padding(neutral: Sequence[_Layer], source: str) -> list[_Layer]:
    """Folds each zero-padding layer into the "valid" conv after it."""
    merged = []
    for layer in neutral:
        pad = merged[-1] if merged and merged[-1].spec.kind == _ZERO_PAD else None
        if layer.spec.kind == _ZERO_PAD and pad is None:
            merged.append(layer)
            continue
        if pad is not None:
            if layer.spec.kind != "conv" or layer.spec.padding != "VALID":
                raise UnsupportedModelError(
                    f"{source}: layer {pad.name!r}: zero padding is supported only right "
                    "before a conv with no padding of its own"
                )
            spec = dataclasses.replace(layer.spec, padding=pad.spec.padding)
            merged[-1] = dataclasses.replace(layer, spec=spec)
            continue
        merged.append(layer)
    if merged and merged[-1].spec.kind == _ZERO_PAD:
        raise UnsupportedModelError(f"{source}: layer {merged[-1].name!r} ends the model")
    return merged


def _same_if_equal(neutral: list[_Layer], inputs: list[tuple]) -> list[_Layer]:
    """Explicit conv padding that is exactly what "SAME" pads on its input, as "SAME"."""
    result = []
    for layer, shape in zip(neutral, inputs):
        spec = layer.spec
        if spec.kind == "conv" and not isinstance(spec.padding, str):
            if _explicit_pads(dataclasses.replace(spec, padding="SAME"), shape) == spec.padding:
                layer = dataclasses.replace(layer, spec=dataclasses.replace(spec, padding="SAME"))
        result.append(layer)
    return result


def _assemble(neutral: Sequence[_Layer], input_hwc: Sequence[int], source: str) -> Ported:
    """Our model and parameters from a chain of neutral layers."""
    neutral = _merge_padding(neutral, source)
    specs = tuple(str(layer.spec) for layer in neutral)
    try:
        layers.parse(specs)
    except layers.SpecError as e:
        raise UnsupportedModelError(
            f"{source}: layer {neutral[e.position].name!r}: {e.why}"
        ) from None
    input_hwc = tuple(int(d) for d in input_hwc)
    module = models.Sequential(specs)
    try:
        expected, inputs = _input_shapes(module, input_hwc)
    except layers.SpecError as e:
        raise UnsupportedModelError(
            f"{source}: layer {neutral[e.position].name!r} does not fit an input of shape "
            f"(H, W, C) = {input_hwc}: {e.why}"
        ) from None
    neutral = _same_if_equal(neutral, inputs)
    specs = tuple(str(layer.spec) for layer in neutral)
    module = models.Sequential(specs)
    params, counts, flatten_order = {}, {"conv": 0, "dense": 0}, "hwc"
    for layer, shape in zip(neutral, inputs):
        kind = layer.spec.kind
        if kind == "flatten":
            flatten_order, flatten_map = layer.order, shape
        if kind not in counts:
            continue
        name = f"{'Conv2D' if kind == 'conv' else 'Dense'}_{counts[kind]}"
        counts[kind] += 1
        kernel = layer.kernel
        if kind == "dense" and flatten_order != "hwc":
            if kernel.shape[0] == np.prod(flatten_map):
                kernel = ops.reorder_flat_kernel(kernel, flatten_map, source="chw", target="hwc")
            flatten_order = "hwc"
        for leaf, value in (("kernel", kernel), ("bias", layer.bias)):
            if value.shape != expected[name][leaf].shape:
                raise UnsupportedModelError(
                    f"{source}: layer {layer.name!r} has a {leaf} of shape {value.shape}, but "
                    f"on an input of shape (H, W, C) = {input_hwc} it needs "
                    f"{expected[name][leaf].shape}; check the input shape"
                )
        params[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(layer.bias)}
    output = jax.eval_shape(module.apply, {"params": params}, jnp.zeros((1, *input_hwc)))
    if len(output.shape) != 2:
        raise UnsupportedModelError(
            f"{source}: the model outputs maps of shape {output.shape[1:]}, not one vector "
            "per image; end it with flatten or global pooling"
        )
    num_classes = output.shape[1]
    body = specs[:-1] if specs[-1] == "softmax" else specs
    preset = _preset(body, num_classes)
    if preset:
        return Ported(preset, num_classes, input_hwc, params, softmax=body != specs)
    return Ported({"name": "sequential", "layers": specs}, num_classes, input_hwc, params)


def _layers(ported: Ported) -> list[tuple[_Layer, tuple]]:
    """Our model as neutral layers (weights in our layouts), each with its input shape."""
    specs = ported.specs()
    _, inputs = _input_shapes(models.Sequential(specs), ported.input_hwc)
    counts, result = {"conv": 0, "dense": 0}, []
    for spec, shape in zip(layers.parse(specs), inputs):
        if spec.kind == "permute":
            raise UnsupportedModelError(
                "export: the 'permute' layer (a fixed shuffle of the flat vector) has no "
                "Keras or PyTorch layer"
            )
        layer = _Layer(spec, str(spec))
        if spec.kind in counts:
            name = f"{'Conv2D' if spec.kind == 'conv' else 'Dense'}_{counts[spec.kind]}"
            counts[spec.kind] += 1
            weights = ported.params[name]
            kernel, bias = (np.asarray(weights[leaf]) for leaf in ("kernel", "bias"))
            layer = _Layer(spec, name, kernel, bias)
        result.append((layer, shape))
    return result


def _explicit_pads(spec: layers.Layer, shape: tuple) -> tuple[tuple[int, int], tuple[int, int]]:
    """``spec``'s padding as ((top, bottom), (left, right)) on an input of ``shape`` (HWC)."""
    effective = tuple(d * (k - 1) + 1 for k, d in zip(spec.kernel, spec.dilation))
    stride = spec.stride or ((1, 1) if spec.kind == "conv" else spec.kernel)
    return ops._explicit_padding(spec.padding, shape[:2], effective, stride, spec.kind)


def from_workdir(
    workdir: str | os.PathLike, *, input_hwc: Sequence[int], num_classes: int
) -> Ported:
    """A model trained by ``train.py``: ``config.json``'s model and ``final_params/``.

    It was trained on images scaled to [0, 1]; feed it (and its exports) those.
    """
    input_hwc = tuple(input_hwc)
    fields, params = checkpoints.load_trained(workdir, input_hwc=input_hwc, num_classes=num_classes)
    return Ported(fields, num_classes, input_hwc, params)


# Keras 3 ---------------------------------------------------------------------


def _keras_weights(layer, spec: layers.Layer) -> _Layer:
    weights = layer.get_weights()
    if len(weights) == 1:  # use_bias=False
        weights.append(np.zeros(weights[0].shape[-1], weights[0].dtype))
    return _Layer(spec, layer.name, weights[0], weights[1])


def _keras_activation(layer, activation: str) -> list[_Layer]:
    if activation in ("linear", None):
        return []
    if activation in ("relu", *layers.FINAL_KINDS):
        return [_Layer(layers.Layer(activation), f"{layer.name} (activation)")]
    raise UnsupportedModelError(
        f"Keras layer {layer.name!r}: activation {activation!r} is not supported; "
        "use 'relu', or 'softmax'/'log_softmax' on the last layer"
    )


def _keras_layer(layer, keras) -> tuple[list[_Layer], str | None]:
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
        return [_Layer(layers.Layer(_ZERO_PAD, padding=padding), layer.name)], config["data_format"]
    if isinstance(layer, (kl.MaxPooling2D, kl.AveragePooling2D)):
        window = tuple(config["pool_size"])
        kind = "max_pool" if isinstance(layer, kl.MaxPooling2D) else "avg_pool"
        stride = tuple(config["strides"] or window)
        spec = layers.Layer(kind, kernel=window, stride=stride, padding=config["padding"].upper())
        return [_Layer(spec, layer.name)], config["data_format"]
    if isinstance(layer, kl.GlobalAveragePooling2D):
        if config.get("keepdims"):
            raise UnsupportedModelError(f"Keras layer {layer.name!r}: keepdims must be False")
        return [_Layer(layers.Layer("global_avg_pool"), layer.name)], config["data_format"]
    if isinstance(layer, kl.Flatten):
        return [_Layer(layers.Layer("flatten"), layer.name)], config["data_format"]
    if isinstance(layer, kl.Dense):
        dense = _keras_weights(layer, layers.Layer("dense", config["units"]))
        return [dense, *_keras_activation(layer, config["activation"])], None
    if isinstance(layer, kl.ReLU):
        if config["max_value"] is not None or config["negative_slope"] or config["threshold"]:
            raise UnsupportedModelError(
                f"Keras layer {layer.name!r}: only a plain ReLU (no max_value, "
                "negative_slope or threshold) is supported"
            )
        return [_Layer(layers.Layer("relu"), layer.name)], None
    if isinstance(layer, kl.Activation):
        return _keras_activation(layer, config["activation"]), None
    if isinstance(layer, kl.Softmax):
        return [_Layer(layers.Layer("softmax"), layer.name)], None
    if isinstance(layer, kl.Dropout):
        return [_Layer(layers.Layer("dropout", rate=float(config["rate"])), layer.name)], None
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
    keras = _require("keras", "from_keras")
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
    return _assemble(neutral, input_hwc, "from_keras")


def load_keras(path: str | os.PathLike) -> Ported:
    """``from_keras`` of a ``.keras`` file, loaded in Keras's safe mode."""
    keras = _require("keras", "load_keras")
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
    keras = _require("keras", "to_keras")
    kl = keras.layers
    model_layers, weights = [kl.Input(ported.input_hwc)], {}
    for layer, _ in _layers(ported):
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


# PyTorch ---------------------------------------------------------------------


def _torch_pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _torch_padding(padding) -> str | tuple:
    if padding in ("same", "valid"):
        return padding.upper()
    h, w = _torch_pair(padding)
    return "VALID" if (h, w) == (0, 0) else ((h, h), (w, w))


def _torch_pool(name: str, kind: str, kernel, stride, padding, ceil_mode=False, **extra) -> _Layer:
    """A max or average pooling layer or call as a neutral layer."""
    plain = not ceil_mode and extra.get("dilation", 1) in (1, (1, 1))
    plain = plain and not extra.get("return_indices") and extra.get("divisor_override") is None
    padded = _torch_pair(padding) != (0, 0)
    if kind == "avg_pool" and padded and extra.get("count_include_pad", True):
        plain = False  # PyTorch's default counts the zero padding in the mean; ours does not.
    if not plain:
        raise UnsupportedModelError(
            f"PyTorch layer {name!r}: pooling with ceil_mode, dilation, return_indices, "
            "divisor_override or (average) count_include_pad=True with padding is not supported"
        )
    kernel = _torch_pair(kernel)
    spec = layers.Layer(
        kind, kernel=kernel, stride=_torch_pair(stride) if stride else kernel,
        padding=_torch_padding(padding),
    )  # fmt: skip
    return _Layer(spec, name)


def _torch_layer(name: str, module, torch) -> list[_Layer]:
    tnn = torch.nn
    if isinstance(module, tnn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise UnsupportedModelError(
                f"PyTorch layer {name!r}: groups must be 1 and padding_mode 'zeros', got "
                f"{module.groups}, {module.padding_mode!r}"
            )
        kernel = module.weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
        spec = layers.Layer(
            "conv", kernel.shape[3], kernel.shape[:2], module.stride,
            _torch_padding(module.padding), module.dilation,
        )  # fmt: skip
        return [_Layer(spec, name, kernel, _torch_bias(module, kernel.shape[3]))]
    if isinstance(module, (tnn.MaxPool2d, tnn.AvgPool2d)):
        kind = "max_pool" if isinstance(module, tnn.MaxPool2d) else "avg_pool"
        extra = {
            key: getattr(module, key)
            for key in ("dilation", "return_indices", "divisor_override", "count_include_pad")
            if hasattr(module, key)
        }
        return [
            _torch_pool(
                name,
                kind,
                module.kernel_size,
                module.stride,
                module.padding,
                module.ceil_mode,
                **extra,
            )  # fmt: skip
        ]
    if isinstance(module, tnn.ZeroPad2d):
        left, right, top, bottom = module.padding
        return [_Layer(layers.Layer(_ZERO_PAD, padding=((top, bottom), (left, right))), name)]
    if isinstance(module, tnn.AdaptiveAvgPool2d):
        return [_torch_global_pool(name, module.output_size)]
    if isinstance(module, tnn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise UnsupportedModelError(f"PyTorch layer {name!r}: Flatten must keep only dim 0")
        return [_Layer(layers.Layer("flatten"), name, order="chw")]
    if isinstance(module, tnn.Linear):
        kernel = module.weight.detach().numpy().T  # (out, in) -> (in, out)
        spec = layers.Layer("dense", kernel.shape[1])
        return [_Layer(spec, name, kernel, _torch_bias(module, kernel.shape[1]))]
    if isinstance(module, tnn.ReLU):
        return [_Layer(layers.Layer("relu"), name)]
    if isinstance(module, (tnn.Softmax, tnn.LogSoftmax)) and module.dim in (1, -1):
        kind = "softmax" if isinstance(module, tnn.Softmax) else "log_softmax"
        return [_Layer(layers.Layer(kind), name)]
    if isinstance(module, tnn.Dropout):
        return [_Layer(layers.Layer("dropout", rate=float(module.p)), name)]
    if isinstance(module, tnn.Identity):
        return []
    if isinstance(module, tnn.Sequential):
        prefix = f"{name}." if name else ""
        children = module.named_children()
        return [x for child, m in children for x in _torch_layer(prefix + child, m, torch)]
    raise UnsupportedModelError(
        f"PyTorch layer {name!r} ({type(module).__name__}) is not supported; "
        f"supported layers: {SUPPORTED_TORCH}"
    )


def _torch_global_pool(name: str, output_size) -> _Layer:
    if _torch_pair(output_size) != (1, 1):
        raise UnsupportedModelError(
            f"PyTorch layer {name!r}: adaptive average pooling is supported to size 1 only "
            f"(global average pooling), got {output_size}"
        )
    return _Layer(layers.Layer("global_avg_pool"), name)


def _torch_bias(module, size: int) -> np.ndarray:
    if module.bias is None:
        return np.zeros(size, np.float32)
    return module.bias.detach().numpy()


def _call_arguments(function, node) -> dict[str, Any]:
    """A traced call's arguments by name (first one, the input, dropped)."""
    import inspect

    signature = inspect.signature(function)
    bound = signature.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])


def _torch_call(node, torch) -> _Layer | None:
    """A traced function or method call as a neutral layer (None: no layer)."""
    F, target = torch.nn.functional, node.target
    if target in (torch.relu, F.relu, "relu"):
        return _Layer(layers.Layer("relu"), node.name)
    if target in (F.max_pool2d, F.avg_pool2d):
        kind = "max_pool" if target is F.max_pool2d else "avg_pool"
        signature = _avg_pool2d_signature if kind == "avg_pool" else _max_pool2d_signature
        args = _call_arguments(signature, node)
        return _torch_pool(node.name, kind, args.pop("kernel_size"), **args)
    if target is F.adaptive_avg_pool2d:
        return _torch_global_pool(node.name, _call_arguments(target, node)["output_size"])
    if target in (F.dropout, "dropout"):
        rate = _call_arguments(F.dropout, node)["p"] if target is F.dropout else node.args[1]
        return _Layer(layers.Layer("dropout", rate=float(rate)), node.name)
    if target in (torch.flatten, "flatten"):
        start = (list(node.args[1:]) or [node.kwargs.get("start_dim", 0)])[0]
        if start != 1:
            raise UnsupportedModelError(
                f"from_torch: {node.name!r}: torch.flatten must start at dim 1 (keep the batch)"
            )
        return _Layer(layers.Layer("flatten"), node.name, order="chw")
    if target in ("view", "reshape"):
        if list(node.args[2:]) != [-1]:
            raise UnsupportedModelError(
                f"from_torch: {node.name!r}: only x.{target}(x.size(0), -1) is supported"
            )
        return _Layer(layers.Layer("flatten"), node.name, order="chw")
    if target in (F.softmax, F.log_softmax, "softmax", "log_softmax"):
        dim = (list(node.args[1:2]) or [node.kwargs.get("dim")])[0]
        if dim not in (1, -1):
            raise UnsupportedModelError(f"from_torch: {node.name!r}: softmax must be over dim 1")
        name = target if isinstance(target, str) else target.__name__
        return _Layer(layers.Layer(name), node.name)
    raise UnsupportedModelError(
        f"from_torch: {node.name!r} ({node.op} {target}) is not supported; supported: "
        f"{SUPPORTED_TORCH}"
    )


def _max_pool2d_signature(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    """``F.max_pool2d``'s arguments (it is a dispatcher without a plain signature)."""


def _avg_pool2d_signature(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
    divisor_override=None,
):  # fmt: skip
    """``F.avg_pool2d``'s arguments (it is a builtin without a Python signature)."""


def _traced_layers(module, torch) -> list[_Layer]:
    """The layers of a non-Sequential module, in the order ``forward`` calls them."""
    graph = torch.fx.symbolic_trace(module).graph
    layers_, previous = [], None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            previous = node if node.op == "placeholder" else previous
            continue
        if node.op == "call_method" and node.target == "size":
            continue  # x.size(0), for x.view(x.size(0), -1).
        if not node.args or node.args[0] is not previous:
            raise UnsupportedModelError(
                f"from_torch: {node.name!r} does not take the previous layer's output; "
                "only a plain chain of layers is supported"
            )
        previous = node
        if node.op == "call_module":
            layers_ += _torch_layer(node.target, module.get_submodule(node.target), torch)
        else:
            layers_.append(_torch_call(node, torch))
    return layers_


def from_torch(module, *, input_chw: Sequence[int]) -> Ported:
    """Our model and parameters from a PyTorch model.

    ``module`` is an ``nn.Sequential``, or any ``nn.Module`` whose ``forward``
    is a plain chain that ``torch.fx`` can trace: modules and the functional
    calls in ``SUPPORTED_TORCH``, as in pytorch/examples' MNIST ``Net``.
    ``input_chw`` is the PyTorch input shape ``(C, H, W)``; ours is NHWC, so
    transpose images with ``images.transpose(0, 2, 3, 1)``. The
    ``.training`` flag at trace time decides nothing: dropout is recorded
    with its rate and is off at inference, as in PyTorch's ``eval()``.
    """
    torch = _require("torch", "from_torch")
    if isinstance(module, torch.nn.Sequential):
        neutral = _torch_layer("", module, torch)
    else:
        neutral = _traced_layers(module, torch)
    c, h, w = input_chw
    return _assemble(_pooled_flat(neutral), (h, w, c), "from_torch")


def _pooled_flat(neutral: list[_Layer]) -> list[_Layer]:
    """Drops the flatten that PyTorch needs after ``AdaptiveAvgPool2d(1)``: ours gives a vector."""
    pooled = [i for i, layer in enumerate(neutral) if layer.spec.kind == "global_avg_pool"]
    if not pooled:
        return neutral
    return [x for i, x in enumerate(neutral) if i < pooled[0] or x.spec.kind != "flatten"]


def from_torch_state_dict(
    state_dict: Mapping[str, Any], model: Mapping[str, Any], *, input_chw: Sequence[int]
) -> Ported:
    """Our model and parameters from a PyTorch ``state_dict`` and a description.

    ``model`` describes the PyTorch network in our terms, as ``config.model``
    does: a preset (e.g. ``dict(name="cnn", conv_features=(32, 64),
    dense_features=(256,))``; missing fields take our defaults) or
    ``dict(name="sequential", layers=(...))``, with its flatten on NCHW maps
    as PyTorch's. The state_dict's ``weight``/``bias`` entries are read in
    order: each goes to the next conv (4-D weights) or dense layer (2-D).
    """
    torch = _require("torch", "from_torch_state_dict")
    c, h, w = input_chw
    template = Ported(model, 1, (h, w, c), None)
    weighted: list[dict[str, Any]] = []
    prefixes: list[str] = []
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias") or not isinstance(value, torch.Tensor):
            raise UnsupportedModelError(
                f"from_torch_state_dict: entry {key!r} is not a weight or bias tensor; "
                f"supported layers: {SUPPORTED_TORCH}"
            )
        if prefix not in prefixes:
            prefixes.append(prefix)
            weighted.append({})
        weighted[-1][leaf] = value.detach().numpy()
    specs = layers.parse(template.specs())
    wanted = [spec for spec in specs if spec.kind in ("conv", "dense")]
    got = ["conv" if x["weight"].ndim == 4 else "dense" for x in weighted]
    if [spec.kind for spec in wanted] != got:
        raise UnsupportedModelError(
            f"from_torch_state_dict: the description's weighted layers are "
            f"{[str(spec) for spec in wanted]}, the state_dict's are {list(zip(prefixes, got))}"
        )
    neutral, found = [], iter(zip(prefixes, weighted))
    for spec in specs:
        if spec.kind == "conv":
            prefix, weights = next(found)
            kernel = weights["weight"].transpose(2, 3, 1, 0)
            bias = weights.get("bias", np.zeros(kernel.shape[3], np.float32))
            spec = dataclasses.replace(spec, features=kernel.shape[3], kernel=kernel.shape[:2])
            neutral.append(_Layer(spec, prefix, kernel, bias))
        elif spec.kind == "dense":
            prefix, weights = next(found)
            kernel = weights["weight"].T
            bias = weights.get("bias", np.zeros(kernel.shape[1], np.float32))
            spec = dataclasses.replace(spec, features=kernel.shape[1])
            neutral.append(_Layer(spec, prefix, kernel, bias))
        else:
            neutral.append(_Layer(spec, str(spec), order="chw"))
    ported = _assemble(_pooled_flat(neutral), (h, w, c), "from_torch_state_dict")
    for key, value in model.items():
        value = tuple(value) if isinstance(value, list | tuple) else value
        if key in ported.model and ported.model[key] != value:
            raise UnsupportedModelError(
                f"from_torch_state_dict: the description says {key}={value!r}, the "
                f"state_dict's weights give {ported.model[key]!r}"
            )
    return ported


def load_torch(
    path: str | os.PathLike, model: Mapping[str, Any], *, input_chw: Sequence[int]
) -> Ported:
    """``from_torch_state_dict`` of a file saved with ``torch.save(m.state_dict())``.

    Read with ``torch.load(weights_only=True)``: a file that holds a pickled
    module or other objects is refused, not executed.
    """
    torch = _require("torch", "load_torch")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_torch: no file at {os.fspath(path)!r}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"load_torch: {os.fspath(path)!r} does not load with weights_only=True (save "
            f"module.state_dict(), not the module): {e}"
        ) from None
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"load_torch: {os.fspath(path)!r} holds a {type(state_dict).__name__}, not a state_dict"
        )
    return from_torch_state_dict(state_dict, model, input_chw=input_chw)


def to_torch(ported: Ported):
    """An ``nn.Sequential`` with ``ported``'s weights (NCHW input ``(C, H, W)``).

    Its ``state_dict()`` is what to save; ``from_torch`` reads it back exactly.
    Padding that PyTorch cannot put on both sides alike (TensorFlow's "SAME"
    with a stride) becomes an ``nn.ZeroPad2d`` before the conv.
    """
    torch = _require("torch", "to_torch")
    tnn = torch.nn
    sequential, flatten_map = tnn.Sequential(), None
    with torch.no_grad():
        for layer, shape in _layers(ported):
            spec = layer.spec
            if spec.kind == "conv":
                (top, bottom), (left, right) = _explicit_pads(spec, shape)
                if (top, left) != (bottom, right):
                    sequential.append(tnn.ZeroPad2d((left, right, top, bottom)))
                    top = left = 0
                new = tnn.Conv2d(
                    shape[2], spec.features, spec.kernel, stride=spec.stride or 1,
                    padding=(top, left), dilation=spec.dilation,
                )  # fmt: skip
                new.weight.copy_(torch.from_numpy(layer.kernel.transpose(3, 2, 0, 1).copy()))
            elif spec.kind in ("max_pool", "avg_pool"):
                (top, bottom), (left, right) = _explicit_pads(spec, shape)
                if (top, left) != (bottom, right) or 2 * max(top, left) > min(spec.kernel):
                    raise UnsupportedModelError(
                        f"to_torch: layer {layer.name!r}: PyTorch pools pad both sides alike, "
                        "by at most half the window"
                    )
                if spec.kind == "avg_pool":
                    new = tnn.AvgPool2d(
                        spec.kernel, spec.stride, (top, left), count_include_pad=False
                    )
                else:
                    new = tnn.MaxPool2d(spec.kernel, spec.stride, (top, left))
            elif spec.kind == "global_avg_pool":
                sequential.append(tnn.AdaptiveAvgPool2d(1))
                new = tnn.Flatten()
            elif spec.kind == "dense":
                kernel = layer.kernel
                if flatten_map is not None:
                    kernel = np.asarray(
                        ops.reorder_flat_kernel(kernel, flatten_map, source="hwc", target="chw")
                    )
                    flatten_map = None
                new = tnn.Linear(*kernel.shape)
                new.weight.copy_(torch.from_numpy(kernel.T.copy()))
            elif spec.kind == "flatten":
                new, flatten_map = tnn.Flatten(), shape
            elif spec.kind == "dropout":
                new = tnn.Dropout(spec.rate)
            elif spec.kind in layers.FINAL_KINDS:
                new = (tnn.Softmax if spec.kind == "softmax" else tnn.LogSoftmax)(dim=1)
            else:
                new = tnn.ReLU()
            if layer.bias is not None:
                new.bias.copy_(torch.from_numpy(layer.bias.copy()))
            sequential.append(new)
    return sequential
