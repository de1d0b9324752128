"""Flax Linen models built only from the pure functions in ``ops``.

``Sequential`` runs any tuple of layer specs (``cnnflat_jax.nn.layers``), such as
``("conv:32:3", "relu", "max_pool:2", "flatten", "dense:10")``. ``CNN`` (conv
-> ReLU -> pool blocks, flatten, dense layers) and ``MLP`` (raw pixels
straight into dense layers) are presets: named fields that build a spec
(``.specs()``) and run it the same way. Layer sizes after a flatten or a
global pool are read from the shapes at initialisation, never written down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cnnflat_jax.nn import layers, ops, presets

__all__ = [
    "POOL_KINDS",
    "PADDINGS",
    "Conv2D",
    "Dense",
    "run_layers",
    "sown_layers",
    "POOLS",
    "SIMPLE",
    "Sequential",
    "CNN",
    "flat_permutation",
    "MLP",
    "MODELS",
    "create_model",
    "from_fields",
    "layer_specs",
]

# CNN's pool field: "stride" means no pooling layer, each conv strides by pool_window.
POOL_KINDS = ("max", "avg", "stride")
PADDINGS = ("SAME", "VALID")  # CNN's conv padding, as ops.conv2d names it.


class Conv2D(nn.Module):
    """``ops.conv2d`` with its HWIO kernel and bias as parameters."""

    features: int
    kernel_size: int | tuple[int, int] = 3
    padding: str | tuple = "SAME"
    lowering: str = "auto"  # See ops.conv2d.
    stride: int | tuple[int, int] = 1
    dilation: int | tuple[int, int] = 1

    @nn.compact
    def __call__(self, x_NHWC: jnp.ndarray) -> jnp.ndarray:
        c_in = x_NHWC.shape[-1]
        size = self.kernel_size
        kh, kw = (size, size) if isinstance(size, int) else size
        height, width = x_NHWC.shape[-3:-1]
        if self.padding == "SAME" and (kh > 2 * height - 1 or kw > 2 * width - 1):
            raise ValueError(  # Its outer taps would only ever meet padding.
                f"kernel {kh}x{kw} with SAME padding is too large for the {height}x{width} "
                f"map: some taps never touch it (at most {2 * height - 1}x{2 * width - 1})"
            )
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, c_in, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return ops.conv2d(
            x_NHWC, kernel, bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, lowering=self.lowering,
        )  # fmt: skip


class Dense(nn.Module):
    """``ops.dense`` with its ``(in, out)`` kernel and bias as parameters."""

    features: int

    @nn.compact
    def __call__(self, x_NxD: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x_NxD.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return ops.dense(x_NxD, kernel, bias)


def run_layers(module: nn.Module, specs: Sequence[str], x: jnp.ndarray, lowering: str):
    """Runs the layer specs on ``x`` inside ``module``'s ``@nn.compact`` call.

    Parameters are ``Conv2D_{i}`` and ``Dense_{i}`` submodules of ``module``.
    Each layer's output is sown under ``intermediates`` as ``layer{position}_{kind}``.
    Dropout is on only when ``apply`` is given a "dropout" PRNG key.
    """
    for position, layer in enumerate(layers.parse(specs)):
        try:
            x = _run_layer(module, layer, x, lowering)
        except ValueError as e:  # A shape that does not fit: name the layer.
            raise layers.SpecError(position, specs[position], str(e)) from None
        module.sow("intermediates", f"layer{position}_{layer.kind}", x)
    return x


def _run_layer(module: nn.Module, layer: layers.Layer, x: jnp.ndarray, lowering: str):
    kind = layer.kind
    if kind == "conv":
        stride = layer.stride or (1, 1)
        conv = Conv2D(layer.features, layer.kernel, layer.padding, lowering, stride, layer.dilation)
        return conv(x)
    if kind in POOLS:
        return POOLS[kind](x, layer.kernel, stride=layer.stride, padding=layer.padding)
    if kind == "dense":
        return Dense(layer.features)(x)
    if kind == "permute":
        return x[:, flat_permutation(x.shape[1])]
    if kind == "dropout":
        dropping = layer.rate and module.has_rng("dropout")
        return ops.dropout(x, layer.rate, module.make_rng("dropout")) if dropping else x
    return SIMPLE[kind](x)


def sown_layers(intermediates: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(kind, value)`` of each layer that ``run_layers`` sowed, in layer order."""
    positions = {name: int(name[len("layer") :].split("_", 1)[0]) for name in intermediates}
    ordered = sorted(intermediates, key=positions.get)
    return [(name.split("_", 1)[1], intermediates[name]) for name in ordered]


POOLS: dict[str, Callable] = {"max_pool": ops.max_pool, "avg_pool": ops.avg_pool}
# The layers without parameters or options; softmax and log_softmax are
# recorded for export only: the model returns the logits before them.
SIMPLE: dict[str, Callable] = {
    "relu": ops.relu,
    "flatten": ops.flatten,
    "global_avg_pool": ops.global_avg_pool,
    "softmax": lambda x: x,
    "log_softmax": lambda x: x,
}


class Sequential(nn.Module):
    """Any stack of ``ops`` as a model: ``layers`` is a tuple of layer specs.

    See ``cnnflat_jax.nn.layers`` for the specs, for example
    ``("conv:32:3", "relu", "max_pool:2", "flatten", "dense:10")``. The
    output is the last layer's (logits; a final softmax or log_softmax is
    recorded, not applied). ``conv_lowering`` is how ``ops.conv2d`` computes.
    """

    layers: tuple[str, ...]
    conv_lowering: str = "auto"

    @nn.compact
    def __call__(self, x_NHWC: jnp.ndarray) -> jnp.ndarray:
        return run_layers(self, self.layers, x_NHWC, self.conv_lowering)


class CNN(nn.Module):
    """Conv blocks -> flatten -> dense layers -> logits: the preset whose spec is ``specs()``.

    Each block is conv2d (``kernel_size`` square, ``padding`` "SAME" or
    "VALID") -> relu -> pool (``pool`` "max" or "avg", window and stride
    ``pool_window``; or "stride": no pooling layer, the conv strides by
    ``pool_window`` instead). The defaults are the classic MNIST network:
    conv32 -> pool -> conv64 -> pool -> flatten (7x7x64 = 3136 on 28x28
    inputs) -> dense 256 -> dense ``num_classes``. ``permute_flat`` shuffles
    the flattened vector by one fixed permutation before the dense layers
    (an experiment: the order of the flatten should not matter).
    """

    num_classes: int = 10
    conv_features: Sequence[int] = presets.CNN["conv_features"]
    kernel_size: int = presets.CNN["kernel_size"]
    padding: str = presets.CNN["padding"]
    pool: str = presets.CNN["pool"]
    pool_window: int = presets.CNN["pool_window"]
    dense_features: Sequence[int] = presets.CNN["dense_features"]
    permute_flat: bool = presets.CNN["permute_flat"]
    conv_lowering: str = presets.CNN["conv_lowering"]  # How ops.conv2d computes.

    def specs(self) -> tuple[str, ...]:
        """This CNN as layer specs."""
        specs = []
        for features in self.conv_features:
            conv = f"conv:{features}:{self.kernel_size}"
            conv += ":padding=valid" if self.padding == "VALID" else ""
            if self.pool == "stride":
                specs += [f"{conv}:stride={self.pool_window}", "relu"]
            else:
                specs += [conv, "relu", f"{self.pool}_pool:{self.pool_window}"]
        specs += ["flatten", *(["permute"] if self.permute_flat else [])]
        specs += [x for features in self.dense_features for x in (f"dense:{features}", "relu")]
        return (*specs, f"dense:{self.num_classes}")

    @nn.compact
    def __call__(self, x_NHWC: jnp.ndarray) -> jnp.ndarray:
        return run_layers(self, self.specs(), x_NHWC, self.conv_lowering)


def flat_permutation(size: int) -> np.ndarray:
    """The fixed permutation that the "permute" layer applies (seed 0)."""
    return np.random.default_rng(0).permutation(size)


class MLP(nn.Module):
    """Flattens raw pixels, then dense layers with ReLU -> logits."""

    num_classes: int = 10
    dense_features: Sequence[int] = (256,)

    def specs(self) -> tuple[str, ...]:
        """This MLP as layer specs."""
        dense = [x for features in self.dense_features for x in (f"dense:{features}", "relu")]
        return ("flatten", *dense, f"dense:{self.num_classes}")

    @nn.compact
    def __call__(self, x_NHWC: jnp.ndarray) -> jnp.ndarray:
        return run_layers(self, self.specs(), x_NHWC, "auto")


MODELS: dict[str, type[nn.Module]] = {"cnn": CNN, "mlp": MLP, "sequential": Sequential}


def create_model(name: str, num_classes: int, **fields) -> nn.Module:
    """Builds ``MODELS[name]`` with ``num_classes`` and the given fields.

    Raises:
      ValueError: for an unknown model name, field or pooling kind.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name]
    known = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"model {name!r} has no field(s) {unknown}; its fields are {sorted(known)}"
        )
    if fields.get("pool", "max") not in POOL_KINDS:
        raise ValueError(f"unknown pool {fields['pool']!r}; choose one of {POOL_KINDS}")
    if fields.get("padding", "SAME") not in PADDINGS:
        raise ValueError(f"unknown padding {fields['padding']!r}; choose one of {PADDINGS}")
    if cls is Sequential:
        # The spec's last layers give the classes; config.check_data checks them.
        return Sequential(**{**fields, "layers": tuple(fields.get("layers", ()))})
    return cls(num_classes=num_classes, **fields)


def from_fields(fields: Mapping[str, Any], num_classes: int) -> nn.Module:
    """``create_model`` from a ``config.model``-style mapping that holds "name"."""
    fields = dict(fields)
    return create_model(fields.pop("name", None), num_classes, **fields)


def layer_specs(model: nn.Module) -> tuple[str, ...]:
    """A model's layers as specs: a ``Sequential``'s own, a preset's ``specs()``."""
    return tuple(model.layers if isinstance(model, Sequential) else model.specs())
