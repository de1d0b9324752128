"""Flax Linen models built only from the pure functions in ``ops``.

``CNN`` is the classic recipe (conv -> ReLU -> pool blocks, flatten, dense
layers); ``MLP`` flattens raw pixels straight into dense layers. Layer sizes
after the flatten are read from the shapes at initialisation, never written
down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cnnflat_jax import ops

POOLS: dict[str, Callable] = {"max": ops.max_pool, "avg": ops.avg_pool}
# "stride": no pooling layer; each conv strides by pool_window instead.
POOL_KINDS = (*POOLS, "stride")
PADDINGS = ("SAME", "VALID")  # Conv padding, as ops.conv2d names it.


class Conv2D(nn.Module):
    """``ops.conv2d`` with its HWIO kernel and bias as parameters."""

    features: int
    kernel_size: int = 3
    padding: str = "SAME"
    lowering: str = "auto"  # See ops.conv2d.
    stride: int = 1

    @nn.compact
    def __call__(self, x_NHWC: jnp.ndarray) -> jnp.ndarray:
        c_in = x_NHWC.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.kernel_size, self.kernel_size, c_in, self.features),
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return ops.conv2d(
            x_NHWC, kernel, bias, stride=self.stride, padding=self.padding, lowering=self.lowering
        )


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


class CNN(nn.Module):
    """Conv blocks -> flatten -> dense layers -> logits.

    Each block is conv2d (``kernel_size`` square, ``padding`` "SAME" or
    "VALID") -> relu -> pool (``pool`` "max" or "avg", window and stride
    ``pool_window``; or "stride": no pooling layer, the conv strides by
    ``pool_window`` instead). The defaults are the classic MNIST network:
    conv32 -> pool -> conv64 -> pool -> flatten (7x7x64 = 3136 on 28x28
    inputs) -> dense 256 -> dense ``num_classes``. ``permute_flat`` shuffles
    the flattened vector by one fixed permutation before the dense layers
    (an experiment: the order of the flatten should not matter).

    Each stage is sown under ``intermediates`` (read them with
    ``apply(..., mutable=["intermediates"])``): ``conv{i}`` after the ReLU,
    ``pool{i}``, ``flatten_input`` (the maps that are flattened) and
    ``flattened``.
    """

    num_classes: int = 10
    conv_features: Sequence[int] = (32, 64)
    kernel_size: int = 3
    padding: str = "SAME"
    pool: str = "max"
    pool_window: int = 2
    dense_features: Sequence[int] = (256,)
    permute_flat: bool = False
    conv_lowering: str = "auto"  # How ops.conv2d computes; values are the same.

    @nn.compact
    def __call__(self, x_NHWC: jnp.ndarray) -> jnp.ndarray:
        strided = self.pool == "stride"
        for i, features in enumerate(self.conv_features):
            stride = self.pool_window if strided else 1
            conv = Conv2D(features, self.kernel_size, self.padding, self.conv_lowering, stride)
            x_NHWC = ops.relu(conv(x_NHWC))
            self.sow("intermediates", f"conv{i}", x_NHWC)
            if not strided:
                x_NHWC = POOLS[self.pool](x_NHWC, self.pool_window)
                self.sow("intermediates", f"pool{i}", x_NHWC)
        self.sow("intermediates", "flatten_input", x_NHWC)
        x_NxD = ops.flatten(x_NHWC)
        if self.permute_flat:
            x_NxD = x_NxD[:, flat_permutation(x_NxD.shape[1])]
        self.sow("intermediates", "flattened", x_NxD)
        for features in self.dense_features:
            x_NxD = ops.relu(Dense(features)(x_NxD))
        return Dense(self.num_classes)(x_NxD)


def flat_permutation(size: int) -> np.ndarray:
    """The fixed permutation that ``CNN(permute_flat=True)`` applies (seed 0)."""
    return np.random.default_rng(0).permutation(size)


class MLP(nn.Module):
    """Flattens raw pixels, then dense layers with ReLU -> logits."""

    num_classes: int = 10
    dense_features: Sequence[int] = (256,)

    @nn.compact
    def __call__(self, x_NHWC: jnp.ndarray) -> jnp.ndarray:
        x_NxD = ops.flatten(x_NHWC)
        for features in self.dense_features:
            x_NxD = ops.relu(Dense(features)(x_NxD))
        return Dense(self.num_classes)(x_NxD)


MODELS: dict[str, type[nn.Module]] = {"cnn": CNN, "mlp": MLP}


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
    return cls(num_classes=num_classes, **fields)


def from_fields(fields: Mapping[str, Any], num_classes: int) -> nn.Module:
    """``create_model`` from a ``config.model``-style mapping that holds "name"."""
    fields = dict(fields)
    return create_model(fields.pop("name", None), num_classes, **fields)
