"""Layer specs: the short strings that describe a ``models.Sequential``.

A model is a tuple of specs, one per layer, run in order::

    ("conv:32:3", "relu", "conv:64:3", "relu", "max_pool:2", "dropout:0.25",
     "flatten", "dense:128", "relu", "dropout:0.5", "dense:10", "log_softmax")

A spec is ``kind``, then positional arguments, then ``key=value`` options,
separated by colons:

=================== ============================================ =====================
spec                meaning                                      options
=================== ============================================ =====================
``conv:F:K``        ``ops.conv2d``, F filters, K x K kernel       ``stride``,
                    (``KxL`` for K x L), bias                     ``padding``,
                                                                  ``dilation``
``relu``            ``ops.relu``
``max_pool:W``      ``ops.max_pool``, W x W window (``WxV``)      ``stride``, ``padding``
``avg_pool:W``      ``ops.avg_pool``                              ``stride``, ``padding``
``global_avg_pool`` ``ops.global_avg_pool``: maps -> channels
``flatten``         ``ops.flatten``: maps -> one vector
``permute``         a fixed permutation (seed 0) of the vector
``dense:F``         ``ops.dense``, F outputs, bias
``dropout:R``       ``ops.dropout`` at rate R, in training only
``softmax``,        last only: recorded for export; ``apply``
``log_softmax``     returns the logits before it
=================== ============================================ =====================

Options: ``stride=S`` (or ``SxT``; pools default to their window),
``padding=same|valid|P|PxQ|TxBxLxR`` (zero rows on top and bottom and zero
columns left and right: P all round, P rows and Q columns, or each side;
convs default to same, pools to valid),
``dilation=D``. Widths after a flatten or a global pool come from the shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

Pair = tuple[int, int]

# kind -> (positional argument names, option names, input: "maps" | "vector" | "any")
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "conv": (("features", "kernel"), ("stride", "padding", "dilation"), "maps"),
    "relu": ((), (), "any"),
    "max_pool": (("window",), ("stride", "padding"), "maps"),
    "avg_pool": (("window",), ("stride", "padding"), "maps"),
    "global_avg_pool": ((), (), "maps"),
    "flatten": ((), (), "maps"),
    "permute": ((), (), "vector"),
    "dense": (("features",), (), "vector"),
    "dropout": (("rate",), (), "any"),
    "softmax": ((), (), "any"),
    "log_softmax": ((), (), "any"),
}
FINAL_KINDS = ("softmax", "log_softmax")


def usage(kind: str) -> str:
    """``"conv:FEATURES:KERNEL"``: how a spec of ``kind`` is written."""
    return ":".join((kind, *(name.upper() for name in KINDS[kind][0])))


USAGE = ", ".join(map(usage, KINDS))  # Every kind, for error messages.


class SpecError(ValueError):
    """A layer spec that does not parse, or does not fit where it stands."""

    def __init__(self, position: int, spec: str, why: str):
        super().__init__(f"layer {position} {spec!r}: {why}")
        self.position, self.spec, self.why = position, spec, why


@dataclasses.dataclass(frozen=True)
class Layer:
    """One parsed spec. Fields a kind does not use keep their defaults."""

    kind: str
    features: int = 0
    kernel: Pair = (1, 1)  # conv kernel; pool window
    stride: Pair | None = None  # None: 1 for convs, the window for pools
    padding: str | tuple[Pair, Pair] = "SAME"
    dilation: Pair = (1, 1)
    rate: float = 0.0

    def __str__(self) -> str:
        return format_layer(self)


def _pair(text: str) -> Pair:
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{text!r} is not a positive integer or AxB")
    return (int(parts[0]), int(parts[-1]))


def _padding(text: str) -> str | tuple[Pair, Pair]:
    if text.lower() in ("same", "valid"):
        return text.upper()
    parts = text.lower().split("x")
    if len(parts) not in (1, 2, 4) or not all(p.isdigit() for p in parts):
        raise ValueError(f"padding {text!r} is not same, valid, P, PxQ or TxBxLxR")
    if len(parts) == 4:
        top, bottom, left, right = map(int, parts)
        return ((top, bottom), (left, right))
    h, w = int(parts[0]), int(parts[-1])
    return ((h, h), (w, w))


def parse_layer(spec: str, position: int = 0) -> Layer:
    """``"conv:32:3:stride=2"`` -> ``Layer``; ``SpecError`` naming what is wrong."""
    if not isinstance(spec, str):
        raise SpecError(position, str(spec), "a layer spec must be a string like 'conv:32:3'")
    kind, *parts = spec.strip().split(":")
    if kind not in KINDS:
        raise SpecError(position, spec, f"unknown layer kind {kind!r}; kinds: {', '.join(KINDS)}")
    arg_names, option_names, _ = KINDS[kind]
    args = [p for p in parts if "=" not in p]
    options = dict(p.split("=", 1) for p in parts if "=" in p)
    if len(args) != len(arg_names) or parts[: len(args)] != args:
        options_text = ", ".join(option_names) or "none"
        raise SpecError(position, spec, f"expected {usage(kind)}, then options: {options_text}")
    unknown = sorted(set(options) - set(option_names))
    if unknown:
        raise SpecError(
            position, spec, f"unknown option(s) {unknown}; {kind} takes {option_names or 'none'}"
        )
    fields = {"kind": kind, "padding": "SAME" if kind == "conv" else "VALID"}
    try:
        for name, text in zip(arg_names, args):
            if name == "rate":
                fields["rate"] = float(text)
                if not 0 <= fields["rate"] < 1:
                    raise ValueError(f"rate {text} is not in [0, 1)")
            elif name == "features":
                if not (text.isdigit() and int(text) > 0):
                    raise ValueError(f"features {text!r} is not a positive integer")
                fields["features"] = int(text)
            else:
                fields["kernel"] = _pair(text)
        for name, text in options.items():
            fields[name] = _padding(text) if name == "padding" else _pair(text)
    except ValueError as e:
        raise SpecError(position, spec, str(e)) from None
    return Layer(**fields)


def parse(specs: Sequence[str]) -> tuple[Layer, ...]:
    """Parses and checks a model: each spec, and that each fits the one before it.

    Convs and pools take maps; ``dense`` and ``permute`` take a vector (after
    ``flatten`` or ``global_avg_pool``); ``softmax``/``log_softmax`` only end
    a model. Raises ``SpecError`` naming the first bad layer and its position.
    """
    if isinstance(specs, str) or not specs:
        raise SpecError(0, str(specs), "a model is a non-empty tuple of layer specs")
    parsed, maps = [], True
    for position, spec in enumerate(specs):
        layer = parse_layer(spec, position)
        takes = KINDS[layer.kind][2]
        if takes == "maps" and not maps:
            raise SpecError(position, spec, f"{layer.kind} needs maps, but the input is a vector")
        if takes == "vector" and maps:
            raise SpecError(
                position, spec, f"{layer.kind} needs a vector; put flatten or global_avg_pool first"
            )
        if layer.kind in FINAL_KINDS and position != len(specs) - 1:
            raise SpecError(position, spec, f"{layer.kind} may only be the last layer")
        maps = maps and layer.kind not in ("flatten", "global_avg_pool")
        parsed.append(layer)
    return tuple(parsed)


def format_layer(layer: Layer) -> str:
    """The spec string of ``layer``, shortest form; ``parse_layer`` reads it back."""

    def pair(p: Pair) -> str:
        return str(p[0]) if p[0] == p[1] else f"{p[0]}x{p[1]}"

    parts = [layer.kind]
    if layer.kind in ("conv", "dense"):
        parts.append(str(layer.features))
    if layer.kind in ("conv", "max_pool", "avg_pool"):
        parts.append(pair(layer.kernel))
        default_stride = (1, 1) if layer.kind == "conv" else layer.kernel
        if layer.stride not in (None, default_stride):
            parts.append(f"stride={pair(layer.stride)}")
        default = "SAME" if layer.kind == "conv" else "VALID"
        if layer.padding != default:
            padding = layer.padding
            if isinstance(padding, str):
                parts.append(f"padding={padding.lower()}")
            elif padding[0][0] == padding[0][1] and padding[1][0] == padding[1][1]:
                parts.append(f"padding={pair((padding[0][0], padding[1][0]))}")
            else:
                parts.append("padding=" + "x".join(str(p) for side in padding for p in side))
        if layer.dilation != (1, 1):
            parts.append(f"dilation={pair(layer.dilation)}")
    if layer.kind == "dropout":
        parts.append(f"{layer.rate:g}")
    return ":".join(parts)


def receptive_field(specs: Sequence[str]) -> Pair:
    """How many input pixels (rows, columns) one unit of the last map sees.

    Counts the convs and pools before the first ``flatten`` or
    ``global_avg_pool``: each widens the field by ``dilation * (kernel - 1)``
    steps of the input distance between neighbouring units, and its stride
    multiplies that distance. (A global pool then sees the whole image, but
    each of its channels is made of units that see this much.)
    """
    size, jump = [1, 1], [1, 1]
    for layer in parse(specs):
        if layer.kind in ("flatten", "global_avg_pool"):
            break
        if layer.kind not in ("conv", "max_pool", "avg_pool"):
            continue
        stride = layer.stride or ((1, 1) if layer.kind == "conv" else layer.kernel)
        for axis in (0, 1):
            size[axis] += layer.dilation[axis] * (layer.kernel[axis] - 1) * jump[axis]
            jump[axis] *= stride[axis]
    return size[0], size[1]
