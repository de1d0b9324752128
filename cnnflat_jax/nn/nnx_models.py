"""The models as ``flax.nnx`` modules: the same layer specs, the same pure ops.

``Sequential`` runs a tuple of layer specs (``cnnflat_jax.nn.layers``) exactly
as the Linen ``models.Sequential`` does, with its parameters held by the
module itself (NNX), so it needs the input's shape when it is built::

    model = nnx_models.Sequential(specs, (28, 28, 1), rngs=nnx.Rngs(0))
    logits = model(images_NHWC)

Parameters convert both ways, keeping Linen's names (``Conv2D_0``,
``Dense_1``, ...): ``from_linen`` builds the NNX module of a Linen model (the
CNN and MLP presets included, through their ``specs()``) holding given Linen
parameters, such as a ``train.py`` run's (``trained_run.load_run``);
``to_linen_params`` gives an NNX module's parameters back in Linen's form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cnnflat_jax.nn import layers, models, ops

__all__ = ["Conv2D", "Dense", "Sequential", "from_linen", "to_linen_params"]


class Conv2D(nnx.Module):
    """``ops.conv2d`` with its HWIO kernel and bias as parameters (Linen's initializers)."""

    def __init__(self, in_features: int, layer: layers.Layer, lowering: str, *, rngs: nnx.Rngs):
        shape = (*layer.kernel, in_features, layer.features)
        self.kernel = nnx.Param(nn.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((layer.features,)))
        self.stride = layer.stride or (1, 1)
        self.padding = layer.padding
        self.dilation = layer.dilation
        self.lowering = lowering

    def __call__(self, x_NHWC: jnp.ndarray) -> jnp.ndarray:
        return ops.conv2d(
            x_NHWC, self.kernel[...], self.bias[...], stride=self.stride,
            padding=self.padding, dilation=self.dilation, lowering=self.lowering,
        )  # fmt: skip


class Dense(nnx.Module):
    """``ops.dense`` with its ``(in, out)`` kernel and bias as parameters."""

    def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs):
        shape = (in_features, features)
        self.kernel = nnx.Param(nn.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((features,)))

    def __call__(self, x_NxD: jnp.ndarray) -> jnp.ndarray:
        return ops.dense(x_NxD, self.kernel[...], self.bias[...])


class Sequential(nnx.Module):
    """Any stack of ``ops`` as an NNX model, for inputs of ``image_shape`` (H, W, C).

    The output is the last layer's (logits; a final softmax or log_softmax is
    recorded, not applied). Dropout is on only when the call is given
    ``rngs`` with a "dropout" stream, as Linen's is with a "dropout" key.

    Raises:
      layers.SpecError: a spec that does not parse, or does not fit its input.
    """

    def __init__(
        self,
        specs: Sequence[str],
        image_shape: Sequence[int],
        *,
        conv_lowering: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.specs = tuple(specs)
        parsed = layers.parse(self.specs)
        self.options = tuple(parsed)
        built: list[nnx.Module | None] = []
        x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        for position, layer in enumerate(parsed):
            module = None
            if layer.kind == "conv":
                module = Conv2D(x.shape[-1], layer, conv_lowering, rngs=rngs)
            elif layer.kind == "dense":
                module = Dense(x.shape[-1], layer.features, rngs=rngs)
            try:
                x = jax.eval_shape(lambda y, m=module, lr=layer: self._layer(lr, m, y, None), x)
            except ValueError as e:  # A shape that does not fit: name the layer.
                raise layers.SpecError(position, self.specs[position], str(e)) from None
            built.append(module)
        self.layers = nnx.List(built)

    @staticmethod
    def _layer(layer: layers.Layer, module, x, rngs: nnx.Rngs | None):
        kind = layer.kind
        if module is not None:
            return module(x)
        if kind in models.POOLS:
            return models.POOLS[kind](x, layer.kernel, stride=layer.stride, padding=layer.padding)
        if kind == "permute":
            return x[:, models.flat_permutation(x.shape[1])]
        if kind == "dropout":
            dropping = layer.rate and rngs is not None and "dropout" in rngs
            return ops.dropout(x, layer.rate, rngs.dropout()) if dropping else x
        return models.SIMPLE[kind](x)

    def __call__(self, x_NHWC: jnp.ndarray, *, rngs: nnx.Rngs | None = None) -> jnp.ndarray:
        for layer, module in zip(self.options, self.layers):
            x_NHWC = self._layer(layer, module, x_NHWC, rngs)
        return x_NHWC


def _linen_names(model: Sequential) -> list[tuple[str, Any]]:
    """``(Linen name, NNX module)`` of each layer with parameters, in order."""
    counts: dict[str, int] = {}
    named = []
    for module in model.layers:
        if module is not None:
            kind = type(module).__name__
            named.append((f"{kind}_{counts.get(kind, 0)}", module))
            counts[kind] = counts.get(kind, 0) + 1
    return named


def from_linen(
    linen_model: nn.Module, params: Mapping[str, Any], image_shape: Sequence[int]
) -> Sequential:
    """The NNX ``Sequential`` of a Linen ``Sequential``, ``CNN`` or ``MLP``, holding
    its Linen ``params`` (``{"Conv2D_0": {"kernel", "bias"}, ...}``).

    Raises:
      ValueError: ``linen_model`` is none of those, or ``params`` are not the
        model's for ``image_shape`` inputs (names, shapes, a missing leaf, or
        values that are not floating point).
    """
    if not isinstance(linen_model, (models.Sequential, models.CNN, models.MLP)):
        raise ValueError(
            f"{type(linen_model).__name__} is not a Linen Sequential, CNN or MLP of "
            "cnnflat_jax.models"
        )
    specs = models.layer_specs(linen_model)
    lowering = getattr(linen_model, "conv_lowering", "auto")
    model = Sequential(specs, image_shape, conv_lowering=lowering, rngs=nnx.Rngs(0))
    named = _linen_names(model)
    if sorted(name for name, _ in named) != sorted(params):
        raise ValueError(
            f"parameters {sorted(params)} are not those of {list(specs)}: "
            f"{sorted(name for name, _ in named)}"
        )
    for name, module in named:
        for leaf in ("kernel", "bias"):
            if leaf not in params[name]:
                raise ValueError(f"{name} has no {leaf}; it holds {sorted(params[name])}")
            value = jnp.asarray(params[name][leaf])
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise ValueError(f"{name}.{leaf} is {value.dtype}, not floating point")
            variable = getattr(module, leaf)
            if value.shape != variable.get_value().shape:
                raise ValueError(
                    f"{name}.{leaf} is {value.shape}, but {list(specs)} on "
                    f"{tuple(image_shape)} inputs takes {variable.get_value().shape}"
                )
            variable.set_value(value)
    return model


def to_linen_params(model: Sequential) -> dict[str, dict[str, jax.Array]]:
    """``model``'s parameters as its Linen twin holds them."""
    return {
        name: {"kernel": module.kernel[...], "bias": module.bias[...]}
        for name, module in _linen_names(model)
    }
