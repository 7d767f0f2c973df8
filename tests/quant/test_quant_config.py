"""``QuantConfig`` validation and the errors ``quantize_model`` raises (docs/methods.md#uniform-quantizers, #public-interface)."""
from __future__ import annotations

import warnings

import pytest
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model
from gdrq_lightning.quant import Method


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.ReLU(), nn.Conv2d(12, 6, 1), nn.Flatten(), nn.Linear(96, 4)
    )


def test_defaults_and_string_options() -> None:
    cfg = QuantConfig()
    assert (cfg.method, cfg.weight_bits, cfg.act_bits, cfg.groups, cfg.k_w, cfg.k_a, cfg.momentum) == (
        Method.gdrq, 4, 4, 1, 2.0, "auto", 0.01,  # docs/methods.md#scale-clip (revised): k_a is calibrated by default
    )
    assert cfg.hwgq_backward.value == "clipped" and cfg.skip is None and cfg.overrides == {}
    assert QuantConfig(method="HWGQ", hwgq_backward="log_tailed").method is Method.hwgq
    assert QuantConfig(method="pact").method == "pact"  # str enum: YAML strings compare equal


@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("value", [0, 9, -1, 2.0, True])
def test_bits_out_of_range(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{field}={value!r}.*1\.\.8"):
        QuantConfig(**{field: value})


@pytest.mark.parametrize("bits", range(1, 9))
def test_bits_in_range(bits: int) -> None:
    cfg = QuantConfig(weight_bits=bits, act_bits=bits)
    assert (cfg.weight_bits, cfg.act_bits) == (bits, bits)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"method": "xnor"}, r"method='xnor'.*gdrq.*lsq"),
        ({"hwgq_backward": "tanh"}, r"hwgq_backward='tanh'.*relu.*clipped.*log_tailed"),
        ({"groups": 0}, r"groups=0"),
        ({"act_groups": 0}, r"act_groups=0"),
        ({"k_w": 0.0}, r"k_w=0\.0"),
        ({"k_a": -1.0}, r"k_a=-1\.0"),
        ({"k_a": "best"}, r"k_a='best' must be a number > 0"),
        ({"momentum": 0.0}, r"momentum=0\.0"),
        ({"momentum": 1.5}, r"momentum=1\.5"),
        ({"pact_decay": -0.1}, r"pact_decay=-0\.1"),
        ({"hwgq_step": 0.0}, r"hwgq_step=0\.0"),
        ({"method": "lsq", "weight_bits": 1}, r"weight_bits=1.*lsq"),
        ({"overrides": {"layer1": {"bits": 3}}}, r"overrides\['layer1'\].*unknown field.*bits"),
    ],
)
def test_invalid_values_name_field_and_value(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("value", [0, 9])
def test_override_bits_error_names_the_layer(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"layer '2': QuantConfig\.{field}={value}"):
        QuantConfig(overrides={"2": {field: value}})


def test_override_unknown_method_names_layer_and_value() -> None:
    with pytest.raises(ValueError, match=r"layer 'layer4\.\*'.*method='xnor'"):
        QuantConfig(overrides={"layer4.*": {"method": "xnor"}})


def test_groups_not_dividing_out_channels_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"layer '2': groups=5 does not divide its 12 output channels"):
        quantize_model(small_net(), QuantConfig(groups=5))  # conv '2' has 12 channels; '0' is skipped


def test_groups_error_via_override_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"layer '4': groups=4 does not divide its 6 output channels"):
        quantize_model(small_net(), QuantConfig(skip=["0"], overrides={"4": {"groups": 4}}))


def test_override_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"overrides pattern 'layer9\.\*' matches no"):
        quantize_model(small_net(), QuantConfig(overrides={"layer9.*": {"weight_bits": 8}}))


def test_skip_matching_nothing_warns() -> None:
    with pytest.warns(UserWarning, match=r"skip pattern 'stem' matches no"):
        quantize_model(small_net(), QuantConfig(skip=["stem", "0"]))


def test_default_skip_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(small_net(), QuantConfig())
