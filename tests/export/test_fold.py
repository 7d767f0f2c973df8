"""Folding group steps into BatchNorm (docs/methods.md#group-quantization): exact formula, eval equality, pairing rules."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model
from gdrq_lightning.export import IntegerConv2d, IntegerLinear, PairingError, fold_groups_into_bn
from gdrq_lightning.export.build import build_qdq_model
from gdrq_lightning.export.fold import fold_with_pairing
from gdrq_lightning.export.report import layer_report


def _outputs(reference: nn.Module, folded: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return reference(x), folded(x)


def _end_to_end_f64(reference: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quant and folded outputs in float64.

    In float32 the two differ by rounding noise, which flips an activation lying on a
    rounding tie to the next level for ~1% of resnet18 images (see test_onnx.py); in
    float64 that cannot happen, so equality of the whole graph is tested exactly.
    """
    ref64 = copy.deepcopy(reference).double()
    return _outputs(ref64, fold_groups_into_bn(ref64), x.double())


def _assert_layers_match_f32(reference: nn.Module, folded: nn.Module, x: torch.Tensor, count: int) -> list[dict]:
    """Float32, teacher-forced: each integer layer (+ folded BN) vs fake-quant layer (+ BN) on the same input."""
    rows = [r for r in layer_report(reference, folded, build_qdq_model(folded, x), x) if r["kind"] != "act"]
    assert len(rows) == count
    for r in rows:
        assert r["max_abs_diff_folded"] <= 1e-5 * r["output_abs_max"], r
    return rows


def test_fold_formula_matches_spec(models):
    """gamma' = gamma*s, mean' = mean/s, beta and var unchanged, bias c/s; codes int8 with Z*s = W_q."""
    ref = models.tiny(bias=True, method="gdrq", weight_bits=4, act_bits=4, groups=4)
    folded = fold_groups_into_bn(ref)
    conv_q, bn = ref.features[3], ref.features[4]
    conv_i, bn_f = folded.features[3], folded.features[4]
    assert isinstance(conv_i, IntegerConv2d) and conv_i.folded_into == "features.4"
    assert conv_i.codes.dtype == torch.int8 and int(conv_i.codes.abs().max()) <= 7
    s = conv_i.step.double()
    wq = conv_q.weight_quantizer(conv_q.weight).detach()
    torch.testing.assert_close(conv_i.codes.float() * conv_i.step.reshape(-1, 1, 1, 1), wq, rtol=0, atol=0)
    assert conv_i.step.unique().numel() == 4  # four groups, two channels each
    torch.testing.assert_close(bn_f.weight, (bn.weight.double() * s).float(), rtol=0, atol=0)
    torch.testing.assert_close(bn_f.running_mean, (bn.running_mean.double() / s).float(), rtol=0, atol=0)
    torch.testing.assert_close(bn_f.bias, bn.bias, rtol=0, atol=0)
    torch.testing.assert_close(bn_f.running_var, bn.running_var, rtol=0, atol=0)
    torch.testing.assert_close(conv_i.bias, (conv_q.bias.double() / s).float(), rtol=0, atol=0)
    assert ref.features[3] is conv_q and type(ref.features[3]).__name__ == "QuantConv2d"  # input untouched


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_tiny_folded_equals_fakequant(models, groups):
    ref = models.tiny(bias=True, method="gdrq", weight_bits=4, act_bits=4, groups=groups)
    folded = fold_groups_into_bn(ref)
    assert sum(isinstance(m, IntegerConv2d) and m.folded_into is not None for m in folded.modules()) == 3
    fc = folded.fc
    assert isinstance(fc, IntegerLinear) and fc.folded_into is None  # no BN after it: step stays an output scale
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y_ref, y = _end_to_end_f64(ref, x)
    assert (y - y_ref).abs().max() <= 1e-6 * y_ref.abs().max()
    _assert_layers_match_f32(ref, folded, x, count=4)


@pytest.mark.parametrize("groups", ["1", "4", "C_out"])
def test_resnet18_folded_equals_fakequant(models, groups):
    """End to end (float64) with activation quantization on, and per layer in float32 to float rounding."""
    cfg = {"overrides": models.PER_CHANNEL} if groups == "C_out" else {"groups": int(groups)}
    ref = models.resnet18(method="gdrq", weight_bits=4, act_bits=4, **cfg)
    folded, pairing = fold_with_pairing(ref)
    assert pairing.source == "fx" and len(pairing.pairs) == 19  # 16 block convs + 3 downsample convs
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y_ref, y = _end_to_end_f64(ref, x)
    assert (y - y_ref).abs().max() <= 1e-6 * y_ref.abs().max()
    rows = _assert_layers_match_f32(ref, folded, x, count=19)
    if groups == "C_out":
        assert {r["groups"] for r in rows} == {64, 128, 256, 512}


def test_unfoldable_pairing_names_the_layer():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(self.stem(x))
            return self.bn(y) + y  # the BN is not the only consumer

    model = quantize_model(Shared(), QuantConfig(skip=["stem"])).eval()
    with pytest.raises(ValueError, match=r"layer 'conv'.*BatchNorm 'bn'.*also"):
        fold_groups_into_bn(model)
    with pytest.raises(PairingError):
        fold_groups_into_bn(model)


class _DataDependent(nn.Module):
    """Python control flow on a tensor value defeats ``torch.fx``; the Sequential layout still pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if x.sum() > -1e9 else x


def test_layout_fallback_when_fx_fails():
    torch.manual_seed(0)
    model = quantize_model(_DataDependent(), QuantConfig(skip=[], groups=2))
    model.train()(torch.randn(2, 3, 8, 8))
    model.eval()
    with pytest.warns(UserWarning, match="torch.fx could not trace"):
        folded, pairing = fold_with_pairing(model)
    assert pairing.source == "layout" and pairing.pairs == {"body.0": "body.1"}
    assert folded.body[3].folded_into is None  # conv -> ReLU: keeps its step as output scale
    x = torch.randn(2, 3, 8, 8)
    y_ref, y = _outputs(model, folded, x)
    assert (y - y_ref).abs().max() <= 1e-5 * y_ref.abs().max()


def test_float_phase_layers_stay_float():
    """Weight quantization off (e.g. the Scale-Clip phase): a float conv with the clipped weight."""
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), QuantConfig(skip=[])).eval()
    model[0].weight_quantizer.set_switches(quant_on=False)
    folded = fold_groups_into_bn(model)
    assert type(folded[0]) is nn.Conv2d
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x).detach(), rtol=0, atol=0)


def test_frozen_bn_folds_and_non_affine_bn_keeps_output_scale():
    """torchvision's FrozenBatchNorm2d (detection backbones) folds; a BN without gamma cannot hold s."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(8)
    frozen.weight.uniform_(0.5, 1.5)
    frozen.running_var.uniform_(0.5, 2.0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), frozen, nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU())
    model = quantize_model(net, QuantConfig(skip=[], groups=4)).eval()
    folded = fold_groups_into_bn(model)
    assert folded[0].folded_into == "1" and folded[2].folded_into is None
    x = torch.randn(2, 3, 8, 8)
    y_ref, y = _outputs(model, folded, x)
    assert (y - y_ref).abs().max() <= 1e-5 * y_ref.abs().max()
