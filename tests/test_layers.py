"""Layer specs: parsing, checking, writing back, and the errors that name the layer."""

import pytest

from cnnflat_jax.nn import layers
from cnnflat_jax.nn.layers import Layer


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("conv:32:3", Layer("conv", 32, (3, 3))),
        ("conv:8:3x5:stride=2:dilation=2", Layer("conv", 8, (3, 5), (2, 2), "SAME", (2, 2))),
        ("conv:8:5:padding=valid", Layer("conv", 8, (5, 5), padding="VALID")),
        ("conv:8:3:padding=2", Layer("conv", 8, (3, 3), padding=((2, 2), (2, 2)))),
        ("conv:8:3:padding=1x0", Layer("conv", 8, (3, 3), padding=((1, 1), (0, 0)))),
        ("max_pool:2", Layer("max_pool", kernel=(2, 2), padding="VALID")),
        ("avg_pool:3:stride=2:padding=same", Layer("avg_pool", 0, (3, 3), (2, 2), "SAME")),
        ("dense:128", Layer("dense", 128, padding="VALID")),
        ("dropout:0.25", Layer("dropout", padding="VALID", rate=0.25)),
        ("global_avg_pool", Layer("global_avg_pool", padding="VALID")),
        ("log_softmax", Layer("log_softmax", padding="VALID")),
    ],
)
def test_parse_layer_reads_every_field_and_writes_it_back(spec, expected):
    layer = layers.parse_layer(spec)
    assert layer == expected
    assert layers.parse_layer(str(layer)) == layer
    assert str(layer) == spec


@pytest.mark.parametrize(
    "specs,position,message",
    [
        (("conv:32:3", "relu", "max_pol:2"), 2, "unknown layer kind 'max_pol'"),
        (("conv:32",), 0, "expected conv:FEATURES:KERNEL"),
        (("conv:0:3",), 0, "features '0' is not a positive integer"),
        (("conv:8:3:stride=0",), 0, "'0' is not a positive integer or AxB"),
        (("conv:8:3:padding=full",), 0, "padding 'full' is not same, valid, P, PxQ or TxBxLxR"),
        (("conv:8:3:window=2",), 0, "unknown option(s) ['window']"),
        (("dropout:1.5",), 0, "rate 1.5 is not in [0, 1)"),
        (("dropout:x",), 0, "could not convert string to float"),
        (("conv:8:3", "dense:10"), 1, "dense needs a vector; put flatten or global_avg_pool first"),
        (("flatten", "conv:8:3"), 1, "conv needs maps, but the input is a vector"),
        (("flatten", "softmax", "dense:3"), 1, "softmax may only be the last layer"),
        (("flatten", "relu:3"), 1, "expected relu, then options: none"),
    ],
)
def test_parse_names_the_bad_layer_and_its_position(specs, position, message):
    with pytest.raises(layers.SpecError) as error:
        layers.parse(specs)
    assert error.value.position == position
    assert str(error.value).startswith(f"layer {position} {specs[position]!r}: ")
    assert message in str(error.value)


@pytest.mark.parametrize("specs", ["conv:8:3,relu", (), [], None])
def test_a_model_is_a_non_empty_tuple_of_specs(specs):
    with pytest.raises(layers.SpecError, match="a model is a non-empty tuple of layer specs"):
        layers.parse(specs)


@pytest.mark.parametrize(
    "specs, expected",
    [
        # conv3 (3) -> pool2 (4, units 2 px apart) -> conv3 (4 + 2*2) -> pool2 (8 + 2).
        (
            ("conv:32:3", "relu", "max_pool:2", "conv:64:3", "relu", "max_pool:2", "flatten"),
            (10, 10),
        ),
        # conv3/2 (3, units 2 apart) -> conv3/2 (3 + 2*2).
        (("conv:32:3:stride=2", "relu", "conv:64:3:stride=2", "global_avg_pool"), (7, 7)),
        (("conv:32:3", "conv:64:3", "flatten", "dense:10"), (5, 5)),
        (("conv:8:3x5:dilation=2", "avg_pool:3x1"), (7, 9)),
        (("flatten", "dense:10"), (1, 1)),
    ],
)
def test_receptive_field_by_hand(specs, expected):
    assert layers.receptive_field(specs) == expected
