"""DoReFa/PACT ``w_scale``: layers with no BatchNorm after them keep their weights' magnitude."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from gdrq_lightning import QuantConfig
from gdrq_lightning.mixed import apply as mixed_apply
from gdrq_lightning.quant import quantize_model
from gdrq_lightning.quant.methods.dorefa import dorefa_weight


class ConvBNHead(nn.Module):
    """conv -> BN -> ReLU -> conv (no BN) -> pool -> linear (no BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.side = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.side(self.body(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _build(method: str = "pact", bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = ConvBNHead()
    with torch.no_grad():
        for layer in (model.side, model.fc):  # small weights, as FPN convs trained without BN have
            layer.weight.mul_(0.1)
    return quantize_model(model, QuantConfig(method=method, weight_bits=bits, act_bits=4, skip=["stem"]))


@pytest.mark.parametrize("method", ["dorefa", "pact"])
def test_only_layers_without_batchnorm_are_rescaled(method: str) -> None:
    model = _build(method)
    model(torch.randn(2, 3, 8, 8))
    body = model.body[0]
    assert not body.weight_quantizer.rescale and float(body.weight_quantizer.w_scale) == 1.0
    assert_close(body.weight_quantizer(body.weight), dorefa_weight(body.weight, 4), atol=0, rtol=0)  # paper's form
    for layer in (model.side, model.fc):
        q = layer.weight_quantizer
        assert q.rescale
        expected = layer.weight.abs().mean() / dorefa_weight(layer.weight, 4).abs().mean()
        assert_close(q.w_scale, expected.detach())
        assert_close(q(layer.weight).abs().mean(), layer.weight.abs().mean())  # magnitude kept


def test_w_scale_is_fixed_once_and_travels_in_the_state_dict() -> None:
    model = _build()
    model(torch.randn(2, 3, 8, 8))
    fixed = model.side.weight_quantizer.w_scale.clone()
    with torch.no_grad():
        model.side.weight.mul_(3.0)  # training moves the weights; the constant stays
    model(torch.randn(2, 3, 8, 8))
    assert_close(model.side.weight_quantizer.w_scale, fixed, atol=0, rtol=0)
    state = model.state_dict()
    assert "side.weight_quantizer.w_scale" in state
    fresh = _build()
    fresh.load_state_dict(state)
    assert_close(fresh.side.weight_quantizer.w_scale, fixed, atol=0, rtol=0)
    fresh(torch.randn(2, 3, 8, 8))  # not fixed again from the loaded (tripled) weights
    assert_close(fresh.side.weight_quantizer.w_scale, fixed, atol=0, rtol=0)


def test_a_state_dict_from_before_w_scale_loads_with_the_old_meaning() -> None:
    model = _build()
    legacy = {k: v for k, v in model.state_dict().items() if not k.endswith("w_scale")}
    fresh = _build()
    fresh.load_state_dict(legacy)  # strict: the missing key is filled, not an error
    assert float(fresh.fc.weight_quantizer.w_scale) == 1.0
    fresh(torch.randn(2, 3, 8, 8))
    fc = fresh.fc
    assert float(fc.weight_quantizer.w_scale) == 1.0 and not fc.weight_quantizer.rescale
    assert_close(fc.weight_quantizer(fc.weight), dorefa_weight(fc.weight, 4), atol=0, rtol=0)


def test_float_weights_loaded_after_the_swap_leave_w_scale_to_be_fixed() -> None:
    """The tasks load pretrained float weights after the swap (no quantizer keys): w_scale is
    then fixed from those weights, not reset to the paper's form."""
    torch.manual_seed(1)
    floats = ConvBNHead()
    with torch.no_grad():
        floats.side.weight.mul_(0.1)
    model = _build()
    model.load_state_dict(floats.state_dict(), strict=False)
    model(torch.randn(2, 3, 8, 8))
    side = model.side
    assert side.weight_quantizer.rescale
    assert_close(side.weight_quantizer(side.weight).abs().mean(), side.weight.abs().mean())


def test_integer_codes_carry_w_scale_in_the_step() -> None:
    model = _build()
    model(torch.randn(2, 3, 8, 8))
    q, w = model.side.weight_quantizer, model.side.weight.detach()
    codes, step = q.to_integer(w)
    assert_close(codes * step[:, None, None, None], q(w))
    assert_close(step, torch.full((8,), float(q.w_scale) / 15))


def test_a_new_bit_width_fixes_w_scale_again() -> None:
    model = _build()
    model(torch.randn(2, 3, 8, 8))
    q, w = model.side.weight_quantizer, model.side.weight
    at4 = q.w_scale.clone()
    mixed_apply._rebits(q, 2, w.detach(), reinit=True)
    model(torch.randn(2, 3, 8, 8))
    expected = w.abs().mean() / dorefa_weight(w, 2).abs().mean()
    assert_close(q.w_scale, expected.detach())
    assert not torch.equal(q.w_scale, at4)


def test_onnx_runtime_reproduces_a_rescaled_layer() -> None:
    pytest.importorskip("onnxruntime")
    import tempfile

    from gdrq_lightning.export import run_onnxruntime, to_onnx

    model = _build()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model.train()(x)  # BN statistics, w_scale fixed
    model.eval()
    assert float(model.fc.weight_quantizer.w_scale) < 0.2  # far from the paper's [-1, 1]
    with tempfile.TemporaryDirectory() as tmp:
        got = run_onnxruntime(to_onnx(model, x[:2], f"{tmp}/m.onnx", calibration=[x]), x)
    with torch.no_grad():
        ref = model(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.05  # without w_scale: off by ~w_scale
