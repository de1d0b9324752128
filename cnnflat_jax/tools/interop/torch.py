"""PyTorch models to and from cnnflat_jax (see ``cnnflat_jax.interop``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cnnflat_jax.nn import layers, ops
from cnnflat_jax.tools.interop.ported import (
    ZERO_PAD,
    NeutralLayer,
    Ported,
    UnsupportedModelError,
    assemble,
    explicit_pads,
    layers_with_inputs,
    require,
)

SUPPORTED_TORCH = (
    "Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Linear, ReLU, Dropout, "
    "Softmax, LogSoftmax, Identity; in forward also F.relu, F.max_pool2d, F.avg_pool2d, "
    "F.adaptive_avg_pool2d(x, 1), F.dropout, torch.flatten(x, 1), x.view(n, -1), "
    "F.softmax and F.log_softmax"
)


def _torch_pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _torch_padding(padding) -> str | tuple:
    if padding in ("same", "valid"):
        return padding.upper()
    h, w = _torch_pair(padding)
    return "VALID" if (h, w) == (0, 0) else ((h, h), (w, w))


def _torch_pool(
    name: str, kind: str, kernel, stride, padding, ceil_mode=False, **extra
) -> NeutralLayer:
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
    return NeutralLayer(spec, name)


def _torch_layer(name: str, module, torch) -> list[NeutralLayer]:
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
        return [NeutralLayer(spec, name, kernel, _torch_bias(module, kernel.shape[3]))]
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
        return [NeutralLayer(layers.Layer(ZERO_PAD, padding=((top, bottom), (left, right))), name)]
    if isinstance(module, tnn.AdaptiveAvgPool2d):
        return [_torch_global_pool(name, module.output_size)]
    if isinstance(module, tnn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise UnsupportedModelError(f"PyTorch layer {name!r}: Flatten must keep only dim 0")
        return [NeutralLayer(layers.Layer("flatten"), name, order="chw")]
    if isinstance(module, tnn.Linear):
        kernel = module.weight.detach().numpy().T  # (out, in) -> (in, out)
        spec = layers.Layer("dense", kernel.shape[1])
        return [NeutralLayer(spec, name, kernel, _torch_bias(module, kernel.shape[1]))]
    if isinstance(module, tnn.ReLU):
        return [NeutralLayer(layers.Layer("relu"), name)]
    if isinstance(module, (tnn.Softmax, tnn.LogSoftmax)) and module.dim in (1, -1):
        kind = "softmax" if isinstance(module, tnn.Softmax) else "log_softmax"
        return [NeutralLayer(layers.Layer(kind), name)]
    if isinstance(module, tnn.Dropout):
        return [NeutralLayer(layers.Layer("dropout", rate=float(module.p)), name)]
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


def _torch_global_pool(name: str, output_size) -> NeutralLayer:
    if _torch_pair(output_size) != (1, 1):
        raise UnsupportedModelError(
            f"PyTorch layer {name!r}: adaptive average pooling is supported to size 1 only "
            f"(global average pooling), got {output_size}"
        )
    return NeutralLayer(layers.Layer("global_avg_pool"), name)


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


def _torch_call(node, torch) -> NeutralLayer | None:
    """A traced function or method call as a neutral layer (None: no layer)."""
    F, target = torch.nn.functional, node.target
    if target in (torch.relu, F.relu, "relu"):
        return NeutralLayer(layers.Layer("relu"), node.name)
    if target in (F.max_pool2d, F.avg_pool2d):
        kind = "max_pool" if target is F.max_pool2d else "avg_pool"
        signature = _avg_pool2d_signature if kind == "avg_pool" else _max_pool2d_signature
        args = _call_arguments(signature, node)
        return _torch_pool(node.name, kind, args.pop("kernel_size"), **args)
    if target is F.adaptive_avg_pool2d:
        return _torch_global_pool(node.name, _call_arguments(target, node)["output_size"])
    if target in (F.dropout, "dropout"):
        rate = _call_arguments(F.dropout, node)["p"] if target is F.dropout else node.args[1]
        return NeutralLayer(layers.Layer("dropout", rate=float(rate)), node.name)
    if target in (torch.flatten, "flatten"):
        start = (list(node.args[1:]) or [node.kwargs.get("start_dim", 0)])[0]
        if start != 1:
            raise UnsupportedModelError(
                f"from_torch: {node.name!r}: torch.flatten must start at dim 1 (keep the batch)"
            )
        return NeutralLayer(layers.Layer("flatten"), node.name, order="chw")
    if target in ("view", "reshape"):
        if list(node.args[2:]) != [-1]:
            raise UnsupportedModelError(
                f"from_torch: {node.name!r}: only x.{target}(x.size(0), -1) is supported"
            )
        return NeutralLayer(layers.Layer("flatten"), node.name, order="chw")
    if target in (F.softmax, F.log_softmax, "softmax", "log_softmax"):
        dim = (list(node.args[1:2]) or [node.kwargs.get("dim")])[0]
        if dim not in (1, -1):
            raise UnsupportedModelError(f"from_torch: {node.name!r}: softmax must be over dim 1")
        name = target if isinstance(target, str) else target.__name__
        return NeutralLayer(layers.Layer(name), node.name)
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


def _traced_layers(module, torch) -> list[NeutralLayer]:
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
    torch = require("torch", "from_torch")
    if isinstance(module, torch.nn.Sequential):
        neutral = _torch_layer("", module, torch)
    else:
        neutral = _traced_layers(module, torch)
    c, h, w = input_chw
    return assemble(_pooled_flat(neutral), (h, w, c), "from_torch")


def _pooled_flat(neutral: list[NeutralLayer]) -> list[NeutralLayer]:
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
    torch = require("torch", "from_torch_state_dict")
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
            neutral.append(NeutralLayer(spec, prefix, kernel, bias))
        elif spec.kind == "dense":
            prefix, weights = next(found)
            kernel = weights["weight"].T
            bias = weights.get("bias", np.zeros(kernel.shape[1], np.float32))
            spec = dataclasses.replace(spec, features=kernel.shape[1])
            neutral.append(NeutralLayer(spec, prefix, kernel, bias))
        else:
            neutral.append(NeutralLayer(spec, str(spec), order="chw"))
    ported = assemble(_pooled_flat(neutral), (h, w, c), "from_torch_state_dict")
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
    torch = require("torch", "load_torch")
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
    torch = require("torch", "to_torch")
    tnn = torch.nn
    sequential, flatten_map = tnn.Sequential(), None
    with torch.no_grad():
        for layer, shape in layers_with_inputs(ported):
            spec = layer.spec
            if spec.kind == "conv":
                (top, bottom), (left, right) = explicit_pads(spec, shape)
                if (top, left) != (bottom, right):
                    sequential.append(tnn.ZeroPad2d((left, right, top, bottom)))
                    top = left = 0
                new = tnn.Conv2d(
                    shape[2], spec.features, spec.kernel, stride=spec.stride or 1,
                    padding=(top, left), dilation=spec.dilation,
                )  # fmt: skip
                new.weight.copy_(torch.from_numpy(layer.kernel.transpose(3, 2, 0, 1).copy()))
            elif spec.kind in ("max_pool", "avg_pool"):
                (top, bottom), (left, right) = explicit_pads(spec, shape)
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
