"""Ports CNNs between cnnflat_jax, Keras 3 and PyTorch, flatten order included.

    from cnnflat_jax import interop

    ported = interop.load_keras("model.keras")    # or from_keras(keras_model)
    ported = interop.from_torch(torch_module, input_chw=(1, 28, 28))
    logits = ported.apply(images_NHWC)             # our models take NHWC
    keras_model = interop.to_keras(ported)
    torch_model = interop.to_torch(ported)         # .state_dict() to save

Every weight moves by an exact transpose or permutation:

- conv kernels: Keras HWIO is ours; PyTorch OIHW -> HWIO.
- dense kernels: Keras ``(in, out)`` is ours; PyTorch ``(out, in)`` -> ``(in, out)``.
- the first dense kernel after the flatten: PyTorch flattens NCHW maps in
  ``(c, h, w)`` order, and so does Keras when channels_first maps meet a
  channels_last ``Flatten``; ours is ``(h, w, c)``, so its rows are reordered
  with ``ops.reorder_flat_kernel``. Forgetting this step is the classic
  porting bug: the network runs and predicts garbage.

Supported layers are Conv2D/Conv2d, max and average pooling, Flatten,
Dense/Linear, ReLU (a layer or ``activation="relu"``), Dropout (dropped: it
is the identity at inference) and a final softmax. They must form our models'
shape: ``(conv -> ReLU -> pool)* -> flatten -> (dense -> ReLU)* -> dense``.

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

from cnnflat_jax import checkpoints, models, ops

SUPPORTED_KERAS = (
    "Conv2D, MaxPooling2D, AveragePooling2D, Flatten, Dense, ReLU, Activation('relu' | "
    "'softmax' | 'linear'), Softmax, Dropout"
)
SUPPORTED_TORCH = "Conv2d, MaxPool2d, AvgPool2d, Flatten, Linear, ReLU, Softmax, Dropout"
_SHAPE = (
    "(conv -> ReLU -> pool)* -> flatten -> (dense -> ReLU)* -> dense [-> softmax], "
    "with one kernel size, conv padding and pooling for every block"
)


class UnsupportedModelError(ValueError):
    """The source model has a layer or a structure that cnnflat_jax lacks."""


@dataclasses.dataclass(frozen=True)
class Ported:
    """A CNN or MLP in cnnflat_jax terms.

    Attributes:
      model: ``models.create_model`` fields plus "name", as ``config.model``.
      num_classes: the size of the output.
      input_hwc: the input shape ``(H, W, C)``; our models take NHWC images.
      params: the parameter tree (``variables["params"]``).
      softmax: whether the source model ended with a softmax. ``apply``
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


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One layer, framework-neutral: weights in our layouts, names for errors."""

    kind: str  # conv | relu | pool | flatten | dense | softmax
    name: str
    kernel: np.ndarray | None = None  # conv HWIO; dense (in, out)
    bias: np.ndarray | None = None
    padding: str = ""  # conv: SAME | VALID
    pool: str = ""  # pool: max | avg
    window: int = 0  # pool: window and stride
    order: str = ""  # flatten: hwc | chw


def _require(module: str, user: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"interop.{user} needs {module}: pip install {module}") from None


def _shapes(module: nn.Module, input_hwc: Sequence[int]) -> tuple[Any, tuple[int, int, int]]:
    """``module``'s parameter shapes and the shape of the maps it flattens."""
    x = jax.ShapeDtypeStruct((1, *input_hwc), jnp.float32)
    init = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, mutable=True), x)
    return init["params"], init.get("intermediates", {}).get("flatten_input", (x,))[0].shape[1:]


def _assemble(layers: Sequence[_Layer], input_hwc: Sequence[int], source: str) -> Ported:
    """Reads our model's fields and parameters off a sequence of layers."""
    layers = list(layers)

    def take(kind: str) -> _Layer:
        found = layers[0] if layers else None
        if found is None or found.kind != kind:
            what = f"layer {found.name!r} ({found.kind})" if found else "the end of the model"
            raise UnsupportedModelError(
                f"{source}: expected {kind} but found {what}; cnnflat_jax models are {_SHAPE}"
            )
        return layers.pop(0)

    convs, pools = [], []
    while layers and layers[0].kind == "conv":
        convs.append(take("conv"))
        take("relu")
        pools.append(take("pool"))
    flatten = take("flatten")
    denses = [take("dense")]
    while layers and layers[0].kind == "relu":
        take("relu")
        denses.append(take("dense"))
    softmax = bool(layers) and layers[0].kind == "softmax"
    if softmax:
        take("softmax")
    if layers:
        take("the end of the model")
    return _build(convs, pools, flatten.order, denses, softmax, input_hwc, source)


def _build(convs, pools, flatten_order, denses, softmax, input_hwc, source) -> Ported:
    for what, values in (
        ("kernel size", [layer.kernel.shape[:2] for layer in convs]),
        ("conv padding", [layer.padding for layer in convs]),
        ("pooling", [(layer.pool, layer.window) for layer in pools]),
    ):
        if len(set(values)) > 1:
            raise UnsupportedModelError(
                f"{source}: cnnflat_jax's CNN uses one {what} for every block; this model "
                f"has {values}"
            )
    if convs and convs[0].kernel.shape[0] != convs[0].kernel.shape[1]:
        raise UnsupportedModelError(
            f"{source}: layer {convs[0].name!r} has a non-square kernel "
            f"{convs[0].kernel.shape[:2]}; cnnflat_jax's CNN uses square kernels"
        )
    fields: dict[str, Any] = {"name": "mlp" if not convs else "cnn"}
    if convs:
        fields.update(
            conv_features=tuple(layer.kernel.shape[3] for layer in convs),
            kernel_size=convs[0].kernel.shape[0],
            padding=convs[0].padding,
            pool=pools[0].pool,
            pool_window=pools[0].window,
        )
    fields["dense_features"] = tuple(layer.kernel.shape[1] for layer in denses[:-1])
    input_hwc = tuple(int(d) for d in input_hwc)
    ported = Ported(fields, denses[-1].kernel.shape[1], input_hwc, None, softmax)
    module = ported.module()
    expected, map_hwc = _shapes(module, input_hwc)
    if denses[0].kernel.shape[0] != np.prod(map_hwc):
        raise UnsupportedModelError(
            f"{source}: layer {denses[0].name!r} takes {denses[0].kernel.shape[0]} inputs, but "
            f"an input of shape (H, W, C) = {input_hwc} flattens to {tuple(map_hwc)} = "
            f"{int(np.prod(map_hwc))} values; check the input shape"
        )
    first_kernel = ops.reorder_flat_kernel(
        denses[0].kernel, map_hwc, source=flatten_order, target="hwc"
    )
    layers = {f"Conv2D_{i}": layer for i, layer in enumerate(convs)}
    layers.update({f"Dense_{i}": layer for i, layer in enumerate(denses)})
    params = {
        name: {"kernel": jnp.asarray(layer.kernel), "bias": jnp.asarray(layer.bias)}
        for name, layer in layers.items()
    }
    params["Dense_0"]["kernel"] = first_kernel
    for name, leaves in expected.items():
        for leaf, shape_dtype in leaves.items():
            if params[name][leaf].shape != shape_dtype.shape:
                raise UnsupportedModelError(
                    f"{source}: layer {layers[name].name!r} has a {leaf} of shape "
                    f"{params[name][leaf].shape}, but the model needs {shape_dtype.shape}"
                )
    return dataclasses.replace(ported, params=params)


def _layers(ported: Ported) -> list[_Layer]:
    """Our model as framework-neutral layers, flatten in (h, w, c) order."""
    module, params = ported.module(), ported.params
    if getattr(module, "pool", "") == "stride" or getattr(module, "permute_flat", False):
        raise UnsupportedModelError(
            "export supports pooled CNNs without permute_flat; this model has "
            f"pool={module.pool!r}, permute_flat={module.permute_flat}"
        )

    def weights(kind: str, name: str, **extra) -> _Layer:
        kernel, bias = (np.asarray(params[name][leaf]) for leaf in ("kernel", "bias"))
        return _Layer(kind, name, kernel, bias, **extra)

    layers = []
    for i in range(len(getattr(module, "conv_features", ()))):
        layers.append(weights("conv", f"Conv2D_{i}", padding=module.padding))
        layers.append(_Layer("relu", f"relu_{i}"))
        layers.append(_Layer("pool", f"pool_{i}", pool=module.pool, window=module.pool_window))
    layers.append(_Layer("flatten", "flatten", order="hwc"))
    num_dense = len(module.dense_features) + 1
    for i in range(num_dense):
        layers.append(weights("dense", f"Dense_{i}"))
        if i < num_dense - 1:
            layers.append(_Layer("relu", f"dense_relu_{i}"))
    if ported.softmax:
        layers.append(_Layer("softmax", "softmax"))
    return layers


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


def _keras_weights(layer, kind: str, **extra) -> _Layer:
    weights = layer.get_weights()
    if len(weights) == 1:  # use_bias=False
        weights.append(np.zeros(weights[0].shape[-1], weights[0].dtype))
    return _Layer(kind, layer.name, weights[0], weights[1], **extra)


def _keras_activation(layer, activation: str) -> list[_Layer]:
    if activation in ("linear", None):
        return []
    if activation in ("relu", "softmax"):
        return [_Layer(activation, f"{layer.name} (activation)")]
    raise UnsupportedModelError(
        f"Keras layer {layer.name!r}: activation {activation!r} is not supported; "
        f"use 'relu', or 'softmax' on the last layer"
    )


def _keras_layer(layer, keras) -> tuple[list[_Layer], str | None]:
    """A Keras layer as neutral layers, and its data_format if it has one."""
    config = layer.get_config()
    kl = keras.layers
    if isinstance(layer, kl.Conv2D):
        if tuple(config["strides"]) != (1, 1) or tuple(config["dilation_rate"]) != (1, 1):
            raise UnsupportedModelError(
                f"Keras layer {layer.name!r}: strides {config['strides']} and dilation "
                f"{config['dilation_rate']} must be 1; cnnflat_jax's CNN pools instead"
            )
        if config.get("groups", 1) != 1:
            raise UnsupportedModelError(f"Keras layer {layer.name!r}: groups must be 1")
        conv = _keras_weights(layer, "conv", padding=config["padding"].upper())
        return [conv, *_keras_activation(layer, config["activation"])], config["data_format"]
    if isinstance(layer, (kl.MaxPooling2D, kl.AveragePooling2D)):
        window = tuple(config["pool_size"])
        if tuple(config["strides"] or window) != window or config["padding"] != "valid":
            raise UnsupportedModelError(
                f"Keras layer {layer.name!r}: pooling must use strides = pool_size and "
                f"padding='valid', got strides {config['strides']}, padding {config['padding']!r}"
            )
        if window[0] != window[1]:
            raise UnsupportedModelError(
                f"Keras layer {layer.name!r}: pool_size {window} must be square"
            )
        kind = "max" if isinstance(layer, kl.MaxPooling2D) else "avg"
        return [_Layer("pool", layer.name, pool=kind, window=window[0])], config["data_format"]
    if isinstance(layer, kl.Flatten):
        return [_Layer("flatten", layer.name)], config["data_format"]
    if isinstance(layer, kl.Dense):
        return [
            _keras_weights(layer, "dense"),
            *_keras_activation(layer, config["activation"]),
        ], None
    if isinstance(layer, kl.ReLU):
        if config["max_value"] is not None or config["negative_slope"] or config["threshold"]:
            raise UnsupportedModelError(
                f"Keras layer {layer.name!r}: only a plain ReLU (no max_value, "
                "negative_slope or threshold) is supported"
            )
        return [_Layer("relu", layer.name)], None
    if isinstance(layer, kl.Activation):
        return _keras_activation(layer, config["activation"]), None
    if isinstance(layer, kl.Softmax):
        return [_Layer("softmax", layer.name)], None
    if isinstance(layer, kl.Dropout):
        return [], None
    raise UnsupportedModelError(
        f"Keras layer {layer.name!r} ({type(layer).__name__}) is not supported; "
        f"supported layers: {SUPPORTED_KERAS}"
    )


def from_keras(model) -> Ported:
    """Our model and parameters from a built Keras 3 ``Sequential`` or functional CNN.

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
        layers, data_format = _keras_layer(layer, keras)
        if isinstance(layer, keras.layers.Flatten):
            flatten_format = data_format
        elif data_format is not None:
            maps_formats.add(data_format)
        neutral.extend(layers)
    if len(maps_formats) > 1:
        raise UnsupportedModelError("from_keras: the layers mix channels_first and channels_last")
    maps_format = maps_formats.pop() if maps_formats else flatten_format or "channels_last"
    if (maps_format, flatten_format) == ("channels_last", "channels_first"):
        raise UnsupportedModelError(
            "from_keras: a channels_first Flatten after channels_last maps scrambles them"
        )
    order = "chw" if (maps_format, flatten_format) == ("channels_first", "channels_last") else "hwc"
    neutral = [dataclasses.replace(x, order=order) if x.kind == "flatten" else x for x in neutral]
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

    Its input is ``(H, W, C)``; a model that came with a softmax keeps it.
    """
    keras = _require("keras", "to_keras")
    kl = keras.layers
    layers, weights = [kl.Input(ported.input_hwc)], {}
    for layer in _layers(ported):
        if layer.kind == "conv":
            size = layer.kernel.shape[0]
            new = kl.Conv2D(layer.kernel.shape[3], size, padding=layer.padding.lower())
        elif layer.kind == "pool":
            new = (kl.MaxPooling2D if layer.pool == "max" else kl.AveragePooling2D)(layer.window)
        elif layer.kind == "dense":
            new = kl.Dense(layer.kernel.shape[1])
        else:
            new = {"relu": kl.ReLU, "flatten": kl.Flatten, "softmax": kl.Softmax}[layer.kind]()
        if layer.kernel is not None:
            weights[id(new)] = [layer.kernel, layer.bias]
        layers.append(new)
    model = keras.Sequential(layers)
    for new in model.layers:
        if id(new) in weights:
            new.set_weights(weights[id(new)])
    return model


# PyTorch ---------------------------------------------------------------------


def _torch_padding(name: str, padding, kernel_size: int) -> str:
    if padding in ("same", "valid"):
        return padding.upper()
    pads = set(padding if isinstance(padding, tuple) else (padding, padding))
    if pads == {0}:
        return "VALID"
    if kernel_size % 2 and pads == {(kernel_size - 1) // 2}:
        return "SAME"
    raise UnsupportedModelError(
        f"PyTorch layer {name!r}: padding {padding!r} is neither 0 (VALID) nor "
        f"{(kernel_size - 1) // 2} (SAME for kernel size {kernel_size})"
    )


def _torch_layer(name: str, module, torch) -> list[_Layer]:
    tnn = torch.nn
    if isinstance(module, tnn.Conv2d):
        if module.stride != (1, 1) or module.dilation != (1, 1) or module.groups != 1:
            raise UnsupportedModelError(
                f"PyTorch layer {name!r}: stride, dilation and groups must be 1, got "
                f"{module.stride}, {module.dilation}, {module.groups}"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedModelError(f"PyTorch layer {name!r}: padding_mode must be 'zeros'")
        kernel = module.weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
        bias = _torch_bias(module, kernel.shape[3])
        padding = _torch_padding(name, module.padding, module.kernel_size[0])
        return [_Layer("conv", name, kernel, bias, padding=padding)]
    if isinstance(module, (tnn.MaxPool2d, tnn.AvgPool2d)):
        window = module.kernel_size
        window = window if isinstance(window, int) else window[0]
        square = {module.kernel_size, module.stride} <= {window, (window, window)}
        plain = module.padding in (0, (0, 0)) and not module.ceil_mode
        if isinstance(module, tnn.MaxPool2d):
            plain = plain and module.dilation in (1, (1, 1)) and not module.return_indices
        else:
            plain = plain and module.divisor_override is None
        if not (square and plain):
            raise UnsupportedModelError(
                f"PyTorch layer {name!r}: pooling must be a square window with stride = "
                "window, no padding, no ceil_mode, got {module}"
            )
        kind = "max" if isinstance(module, tnn.MaxPool2d) else "avg"
        return [_Layer("pool", name, pool=kind, window=window)]
    if isinstance(module, tnn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise UnsupportedModelError(f"PyTorch layer {name!r}: Flatten must keep only dim 0")
        return [_Layer("flatten", name, order="chw")]
    if isinstance(module, tnn.Linear):
        kernel = module.weight.detach().numpy().T  # (out, in) -> (in, out)
        return [_Layer("dense", name, kernel, _torch_bias(module, kernel.shape[1]))]
    if isinstance(module, tnn.ReLU):
        return [_Layer("relu", name)]
    if isinstance(module, tnn.Softmax) and module.dim in (1, -1):
        return [_Layer("softmax", name)]
    if isinstance(module, (tnn.Dropout, tnn.Identity)):
        return []
    if isinstance(module, tnn.Sequential):
        prefix = f"{name}." if name else ""
        children = module.named_children()
        return [x for child, m in children for x in _torch_layer(prefix + child, m, torch)]
    raise UnsupportedModelError(
        f"PyTorch layer {name!r} ({type(module).__name__}) is not supported; "
        f"supported layers: {SUPPORTED_TORCH}"
    )


def _torch_bias(module, size: int) -> np.ndarray:
    if module.bias is None:
        return np.zeros(size, np.float32)
    return module.bias.detach().numpy()


def _traced_layers(module, torch) -> list[_Layer]:
    """The layers of a non-Sequential module, in the order ``forward`` calls them."""
    functional = torch.nn.functional
    relus = {torch.relu, functional.relu}
    graph = torch.fx.symbolic_trace(module).graph
    layers, previous = [], None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            previous = node if node.op == "placeholder" else previous
            continue
        if not node.args or node.args[0] is not previous:
            raise UnsupportedModelError(
                f"from_torch: {node.name!r} does not take the previous layer's output; "
                "only a plain chain of layers is supported"
            )
        previous = node
        if node.op == "call_module":
            layers += _torch_layer(node.target, module.get_submodule(node.target), torch)
        elif node.target in relus or node.target == "relu":
            layers.append(_Layer("relu", node.name))
        elif node.target in (torch.flatten, "flatten", "view", "reshape"):
            layers.append(_Layer("flatten", node.name, order="chw"))
        else:
            raise UnsupportedModelError(
                f"from_torch: {node.name!r} ({node.op} {node.target}) is not supported; use "
                f"modules ({SUPPORTED_TORCH}), F.relu and torch.flatten"
            )
    return layers


def from_torch(module, *, input_chw: Sequence[int]) -> Ported:
    """Our model and parameters from a PyTorch CNN.

    ``module`` is an ``nn.Sequential``, or any ``nn.Module`` whose ``forward``
    is a plain chain that ``torch.fx`` can trace (modules, ``F.relu``,
    ``torch.flatten`` / ``x.view(n, -1)``). ``input_chw`` is the PyTorch input
    shape ``(C, H, W)``; ours is NHWC, so transpose images with
    ``images.transpose(0, 2, 3, 1)``.
    """
    torch = _require("torch", "from_torch")
    if isinstance(module, torch.nn.Sequential):
        layers = _torch_layer("", module, torch)
    else:
        layers = _traced_layers(module, torch)
    c, h, w = input_chw
    return _assemble(layers, (h, w, c), "from_torch")


def from_torch_state_dict(
    state_dict: Mapping[str, Any], model: Mapping[str, Any], *, input_chw: Sequence[int]
) -> Ported:
    """Our model and parameters from a PyTorch ``state_dict`` and a description.

    ``model`` describes the PyTorch network in our terms, as ``config.model``
    does (e.g. ``dict(name="cnn", conv_features=(32, 64), padding="SAME",
    pool="max", pool_window=2, dense_features=(256,))``; missing fields take
    our defaults): conv -> ReLU -> pool blocks, ``nn.Flatten`` on NCHW maps,
    then Linear layers with ReLUs. The state_dict's ``weight``/``bias``
    entries are read in order: 4-D weights are the convs, 2-D the Linears.
    """
    torch = _require("torch", "from_torch_state_dict")
    template = models.from_fields(model, 1)
    params = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias") or not isinstance(value, torch.Tensor):
            raise UnsupportedModelError(
                f"from_torch_state_dict: entry {key!r} is not a weight or bias tensor; "
                f"supported layers: {SUPPORTED_TORCH}"
            )
        params.setdefault(prefix, {})[leaf] = value
    conv_layers = [p for p, v in params.items() if v["weight"].ndim == 4]
    dense_layers = [p for p, v in params.items() if v["weight"].ndim == 2]
    num_convs = len(getattr(template, "conv_features", ()))
    if len(conv_layers) != num_convs or len(dense_layers) != len(template.dense_features) + 1:
        raise UnsupportedModelError(
            f"from_torch_state_dict: the description has {num_convs} convs and "
            f"{len(template.dense_features) + 1} Linear layers, the state_dict has conv "
            f"weights {conv_layers} and Linear weights {dense_layers}"
        )
    sequential = torch.nn.Sequential()
    for prefix in conv_layers:
        out, c_in, k, _ = params[prefix]["weight"].shape
        padding = k // 2 if template.padding == "SAME" else 0
        pool = torch.nn.MaxPool2d if template.pool == "max" else torch.nn.AvgPool2d
        conv = torch.nn.Conv2d(c_in, out, k, padding=padding, bias="bias" in params[prefix])
        sequential.extend([conv, torch.nn.ReLU(), pool(template.pool_window)])
    sequential.append(torch.nn.Flatten())
    for i, prefix in enumerate(dense_layers):
        out, d_in = params[prefix]["weight"].shape
        sequential.append(torch.nn.Linear(d_in, out, bias="bias" in params[prefix]))
        if i < len(dense_layers) - 1:
            sequential.append(torch.nn.ReLU())
    weighted = [m for m in sequential if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.no_grad():
        for prefix, layer in zip(conv_layers + dense_layers, weighted):
            for leaf, value in params[prefix].items():
                getattr(layer, leaf).copy_(value)
    ported = from_torch(sequential, input_chw=input_chw)
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
    """
    torch = _require("torch", "to_torch")
    tnn = torch.nn
    _, map_hwc = _shapes(ported.module(), ported.input_hwc)
    sequential, after_flatten = tnn.Sequential(), False
    with torch.no_grad():
        for layer in _layers(ported):
            if layer.kind == "conv":
                k, _, c_in, out = layer.kernel.shape
                new = tnn.Conv2d(c_in, out, k, padding=layer.padding.lower())
                new.weight.copy_(torch.from_numpy(layer.kernel.transpose(3, 2, 0, 1).copy()))
            elif layer.kind == "pool":
                new = (tnn.MaxPool2d if layer.pool == "max" else tnn.AvgPool2d)(layer.window)
            elif layer.kind == "dense":
                kernel = layer.kernel
                if after_flatten:
                    kernel = np.asarray(
                        ops.reorder_flat_kernel(kernel, map_hwc, source="hwc", target="chw")
                    )
                    after_flatten = False
                new = tnn.Linear(*kernel.shape)
                new.weight.copy_(torch.from_numpy(kernel.T.copy()))
            else:
                new = {"relu": tnn.ReLU, "flatten": tnn.Flatten, "softmax": tnn.Softmax}[layer.kind]
                new = new(dim=1) if layer.kind == "softmax" else new()
                after_flatten = after_flatten or layer.kind == "flatten"
            if layer.bias is not None:
                new.bias.copy_(torch.from_numpy(layer.bias.copy()))
            sequential.append(new)
    return sequential
