"""Models in cnnflat_jax terms, the framework-neutral layers they are ported through,
and a trained run as a ``Ported`` model."""

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

from cnnflat_jax.errors import Error
from cnnflat_jax.nn import arguments, layers, models, ops
from cnnflat_jax.run import trained_run


class UnsupportedModelError(Error, ValueError):
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
        specs = models.layer_specs(self.module())
        if self.softmax and specs[-1] not in layers.FINAL_KINDS:
            specs += ("softmax",)
        return specs


@dataclasses.dataclass(frozen=True)
class NeutralLayer:
    """One layer, framework-neutral: its spec, weights in our layouts, a name for errors."""

    spec: layers.Layer
    name: str
    kernel: np.ndarray | None = None  # conv HWIO; dense (in, out)
    bias: np.ndarray | None = None
    order: str = "hwc"  # flatten: the order the source flattens maps in (hwc | chw)


def require(module: str, user: str):
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
ZERO_PAD = "zero_pad"


def _merge_padding(neutral: Sequence[NeutralLayer], source: str) -> list[NeutralLayer]:
    """Folds each zero-padding layer into the "valid" conv after it."""
    merged = []
    for layer in neutral:
        pad = merged[-1] if merged and merged[-1].spec.kind == ZERO_PAD else None
        if layer.spec.kind == ZERO_PAD and pad is None:
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
    if merged and merged[-1].spec.kind == ZERO_PAD:
        raise UnsupportedModelError(f"{source}: layer {merged[-1].name!r} ends the model")
    return merged


def _same_if_equal(neutral: list[NeutralLayer], inputs: list[tuple]) -> list[NeutralLayer]:
    """Explicit conv padding that is exactly what "SAME" pads on its input, as "SAME"."""
    result = []
    for layer, shape in zip(neutral, inputs):
        spec = layer.spec
        if spec.kind == "conv" and not isinstance(spec.padding, str):
            if explicit_pads(dataclasses.replace(spec, padding="SAME"), shape) == spec.padding:
                layer = dataclasses.replace(layer, spec=dataclasses.replace(spec, padding="SAME"))
        result.append(layer)
    return result


def assemble(neutral: Sequence[NeutralLayer], input_hwc: Sequence[int], source: str) -> Ported:
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


def layers_with_inputs(ported: Ported) -> list[tuple[NeutralLayer, tuple]]:
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
        layer = NeutralLayer(spec, str(spec))
        if spec.kind in counts:
            name = f"{'Conv2D' if spec.kind == 'conv' else 'Dense'}_{counts[spec.kind]}"
            counts[spec.kind] += 1
            weights = ported.params[name]
            kernel, bias = (np.asarray(weights[leaf]) for leaf in ("kernel", "bias"))
            layer = NeutralLayer(spec, name, kernel, bias)
        result.append((layer, shape))
    return result


def explicit_pads(spec: layers.Layer, shape: tuple) -> tuple[tuple[int, int], tuple[int, int]]:
    """``spec``'s padding as ((top, bottom), (left, right)) on an input of ``shape`` (HWC)."""
    effective = tuple(d * (k - 1) + 1 for k, d in zip(spec.kernel, spec.dilation))
    stride = spec.stride or ((1, 1) if spec.kind == "conv" else spec.kernel)
    return arguments.explicit_padding(spec.padding, shape[:2], effective, stride, spec.kind)


def from_workdir(
    workdir: str | os.PathLike,
    *,
    input_hwc: Sequence[int] | None = None,
    num_classes: int | None = None,
    member: int | None = None,
) -> Ported:
    """A model trained by ``train.py`` (``trained_run.load_run``): a population's
    ``member``. ``input_hwc`` and ``num_classes``, when given, must match the run's.

    It was trained on images scaled to [0, 1]; feed it (and its exports) those.
    """
    run = trained_run.load_run(workdir, member)
    run_hwc, run_classes = tuple(run.data["image_shape"]), run.data["num_classes"]
    for name, given, actual in (
        ("input_hwc", input_hwc, run_hwc),
        ("num_classes", num_classes, run_classes),
    ):
        if given is not None and tuple(np.atleast_1d(given)) != tuple(np.atleast_1d(actual)):
            raise UnsupportedModelError(f"from_workdir: {name}={given}, but the run's is {actual}")
    return Ported(trained_run.model_fields(run.config), run_classes, run_hwc, run.params)
