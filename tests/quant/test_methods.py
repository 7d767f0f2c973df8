"""The method registry: every method has one home and quantizers hold only what it needs."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from gdrq_lightning import Method, QuantConfig
from gdrq_lightning.quant import ActQuantizer, WeightQuantizer
from gdrq_lightning.quant.methods import method_spec

METHODS = [m for m in Method if m != Method.none]


def test_every_method_is_registered() -> None:
    for method in METHODS:
        spec = method_spec(method)
        assert issubclass(spec.weight, WeightQuantizer) and issubclass(spec.act, ActQuantizer)


def test_unregistered_method_error_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="has no implementation; registered: dorefa, gdrq, group, hwgq, lsq"):
        method_spec(Method.none)


@pytest.mark.parametrize("method", METHODS)
def test_base_classes_build_the_configured_method(method: Method) -> None:
    cfg = QuantConfig(method=method, weight_bits=2)
    wq, aq = WeightQuantizer(cfg, 8), ActQuantizer(cfg)
    assert type(wq) is method_spec(method).weight and type(aq) is method_spec(method).act
    assert wq.method == aq.method == method


@pytest.mark.parametrize(
    "method, act_state",
    [
        ("gdrq", {"running_abs_mean", "initialized", "k", "k_calibrated"}),
        ("group", {"running_max", "initialized", "k", "k_calibrated"}),
        ("pact", {"alpha"}),
        ("lsq", {"step", "step_initialized"}),
        ("hwgq", set()),
        ("dorefa", set()),
    ],
)
def test_activation_quantizers_hold_only_their_method_state(method: str, act_state: set[str]) -> None:
    switches = {"clip_on", "quant_on"}  # the schedule's, on every quantizer
    assert set(ActQuantizer(QuantConfig(method=method)).state_dict()) == switches | act_state


def test_submodule_imports_as_a_module() -> None:
    m = importlib.import_module("gdrq_lightning.quant.quantizers")
    import gdrq_lightning.quant.quantizers as alias

    assert inspect.ismodule(m) and alias is m and hasattr(m, "WeightQuantizer")


@pytest.mark.parametrize("method", METHODS)
def test_clip_values_and_export_grids(method: Method) -> None:
    cfg = QuantConfig(method=method, weight_bits=4, act_bits=4)
    aq = ActQuantizer(cfg).train()
    aq(torch.randn(2, 4, 3, 3))
    clip = aq.clip_value()
    assert clip is not None and float(clip) > 0
    grid = aq.eval().export_grid(4)
    assert grid.qmax <= 15 and float(grid.scale.min()) > 0
    w = torch.randn(8, 4, 3, 3)
    wq = WeightQuantizer(cfg, 8)
    wq(w)
    clip_w = wq.clip_value(w)
    assert clip_w is None or (clip_w > 0).all()
