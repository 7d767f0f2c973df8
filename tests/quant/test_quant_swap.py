"""``quantize_model`` on real torchvision / timm models: swap, skip, overrides, state_dict (docs/methods.md#schedule, #public-interface)."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.testing import assert_close

from gdrq_lightning import QuantConfig, quantize_model, quantized_layers
from gdrq_lightning.quant import QuantConv2d, QuantLinear, QuantReLU, QuantReLU6, dequantize_model, set_quant_state
from gdrq_lightning.quant.quantizers import ActQuantizer, WeightQuantizer
from gdrq_lightning.quant.swap import default_skip

METHODS = ("gdrq", "scale_clip", "group", "hwgq", "dorefa", "pact", "lsq")


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert_close(actual, expected, atol=0, rtol=0)


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def float_layers(model: nn.Module, kind: type[nn.Module]) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is kind]


def all_off(model: nn.Module) -> None:
    set_quant_state(model, scale_clip=False, quant_weights=False, quant_acts=False)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


def test_resnet18_gdrq_w4a4_swap_forward_backward(image: torch.Tensor) -> None:
    model = resnet18()
    assert default_skip(model) == ["conv1", "fc"]
    n_convs = len(float_layers(model, nn.Conv2d))
    quantize_model(model, QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=8))
    assert float_layers(model, nn.Conv2d) == ["conv1"] and float_layers(model, nn.Linear) == ["fc"]
    names = dict(quantized_layers(model))
    assert sum(isinstance(m, QuantConv2d) for m in names.values()) == n_convs - 1
    assert "layer2.0.downsample.0" in names and "relu" in names and "layer4.1.relu" in names
    assert not any(isinstance(m, QuantLinear) for m in names.values())
    assert all(type(m) is not nn.ReLU for _, m in model.named_modules())
    wq = model.layer1[0].conv1.weight_quantizer
    assert (wq.bits, wq.quant_groups, wq.k, wq.is_on("clip_on"), wq.is_on("quant_on"), wq.is_on("groups_on")) == (
        4, 8, 2.0, True, True, True,
    )
    out = model(image)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("method", METHODS)
def test_every_method_quantizes_resnet18(method: str) -> None:
    image = torch.randn(2, 3, 16, 16)
    ref = resnet18()
    model = quantize_model(copy.deepcopy(ref), QuantConfig(method=method, weight_bits=4, act_bits=4, groups=2))
    assert len(quantized_layers(model)) > 20
    # everything off: bit-for-bit the float model
    all_off(model)
    ref.eval(), model.eval()
    with torch.no_grad():
        exact(model(image), ref(image))
    # everything on: finite, trainable, and different from float
    set_quant_state(model, scale_clip=True, quant_weights=True, quant_acts=True, groups=True)
    ref.train(), model.train()
    out = model(image)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        assert (out - ref(image)).abs().max() > 1e-3
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_method_none_returns_model_untouched() -> None:
    model = resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_model(model, QuantConfig(method="none")) is model
    assert quantized_layers(model) == []
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_swap_shares_parameters_and_keeps_weight_keys() -> None:
    model = resnet18()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    quantize_model(model, QuantConfig(method="lsq", groups=2))
    new_params = dict(model.named_parameters())
    assert all(new_params[k] is p for k, p in params.items())  # same Parameter objects
    new_keys = list(model.state_dict())
    assert set(keys) <= set(new_keys)
    extra = set(new_keys) - set(keys)
    assert extra and all(".weight_quantizer." in k or ".act_quantizer." in k for k in extra)
    assert "layer1.0.conv1.weight_quantizer.step" in new_params  # learned steps join the optimizer's view
    # and back: the float layers hold the very same Parameters
    dequantize_model(model)
    assert quantized_layers(model) == [] and list(model.state_dict()) == keys
    assert all(dict(model.named_parameters())[k] is p for k, p in params.items())


@pytest.mark.parametrize("method", ["gdrq", "lsq", "pact"])
def test_state_dict_round_trip_with_switches(method: str, image: torch.Tensor) -> None:
    cfg = QuantConfig(method=method, weight_bits=4, act_bits=3, groups=4)
    a = quantize_model(resnet18(), cfg).train()
    with torch.no_grad():
        for _ in range(3):  # EMA statistics / LSQ steps become non-trivial
            a(torch.randn(2, 3, 32, 32))
    a.layer1[0].relu.act_quantizer.set_switches(quant_on=False)
    a.layer2[0].conv1.weight_quantizer.set_switches(clip_on=False, groups_on=False)
    a.layer3[1].conv2.weight_quantizer.set_switches(quant_on=False)
    state = a.state_dict()

    torch.manual_seed(1)  # different float weights, so loading has to do the work
    b = quantize_model(resnet18(), cfg)
    b.load_state_dict(state, strict=True)
    assert b.layer1[0].relu.act_quantizer.is_on("quant_on") is False
    assert b.layer2[0].conv1.weight_quantizer.is_on("groups_on") is False
    assert b.layer2[0].conv1.weight_quantizer.is_on("clip_on") is False
    assert b.layer3[1].conv2.weight_quantizer.is_on("quant_on") is False
    assert b.layer1[0].conv1.weight_quantizer.is_on("quant_on") is True
    if method == "gdrq":
        assert float(b.layer1[0].relu.act_quantizer.running_abs_mean) > 0
    a.eval(), b.eval()
    with torch.no_grad():
        exact(b(image), a(image))
        # the switches matter: turning them back on changes the output of both alike
        for m in (a, b):
            m.layer1[0].relu.act_quantizer.set_switches(quant_on=True)
        exact(b(image), a(image))
        b.layer3[1].conv2.weight_quantizer.set_switches(quant_on=True)
        assert not torch.equal(b(image), a(image))


def test_overrides_mixed_precision(image: torch.Tensor) -> None:
    cfg = QuantConfig(
        method="gdrq", weight_bits=4, act_bits=4, groups=1,
        overrides={
            "layer4": {"weight_bits": 8, "act_bits": 8, "groups": 4},
            "layer4.1.conv2": {"weight_bits": 6},  # later patterns win
            "layer1.0.conv1": {"weight_bits": 2, "k_w": 3.0},
            "layer2.*.relu": {"act_bits": 3},
            "layer3.0.downsample.0": {"method": "none"},
        },
    )
    model = quantize_model(resnet18(), cfg)
    expected_w = {"layer4.0.conv1": (8, 4), "layer4.0.downsample.0": (8, 4), "layer4.1.conv1": (8, 4),
                  "layer4.1.conv2": (6, 4), "layer1.0.conv1": (2, 1), "layer1.0.conv2": (4, 1),
                  "layer3.1.conv2": (4, 1)}
    for name, (bits, groups) in expected_w.items():
        wq = model.get_submodule(name).weight_quantizer
        assert (wq.bits, wq.quant_groups) == (bits, groups), name
    assert model.layer1[0].conv1.weight_quantizer.k == 3.0 and model.layer1[0].conv2.weight_quantizer.k == 2.0
    acts = {n: m.act_quantizer.bits for n, m in quantized_layers(model) if isinstance(m, QuantReLU)}
    assert acts["layer4.0.relu"] == acts["layer4.1.relu"] == 8
    assert acts["layer2.0.relu"] == acts["layer2.1.relu"] == 3
    assert acts["relu"] == acts["layer1.0.relu"] == acts["layer3.1.relu"] == 4
    assert type(model.layer3[0].downsample[0]) is nn.Conv2d
    assert torch.isfinite(model(image)).all()


def test_skip_and_filter_fn() -> None:
    model = quantize_model(resnet18(), QuantConfig(skip=[]))
    assert float_layers(model, nn.Conv2d) == [] and float_layers(model, nn.Linear) == []
    assert isinstance(model.fc, QuantLinear)
    model = quantize_model(resnet18(), QuantConfig(skip=["layer1", "conv1"]))
    assert float_layers(model, nn.Conv2d) == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1",
                                              "layer1.1.conv2"]
    assert isinstance(model.fc, QuantLinear)
    model = quantize_model(resnet18(), QuantConfig(), filter_fn=lambda m, name: not isinstance(m, nn.ReLU))
    assert not any(isinstance(m, QuantReLU) for _, m in quantized_layers(model))
    assert isinstance(model.layer1[0].conv1, QuantConv2d)


def test_default_skip_without_linear_keeps_last_conv() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert default_skip(net) == ["0", "4"]
    quantize_model(net, QuantConfig())
    assert [n for n, _ in quantized_layers(net)] == ["1", "2", "3"]


def test_mobilenet_v3_small(image: torch.Tensor) -> None:
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    quantize_model(model, QuantConfig(method="gdrq", groups=2))
    assert float_layers(model, nn.Conv2d) == ["features.0.0"] and float_layers(model, nn.Linear) == ["classifier.3"]
    assert isinstance(model.classifier[0], QuantLinear)
    assert any(isinstance(m, QuantReLU) for _, m in quantized_layers(model))  # ReLUs in the SE blocks / stem
    out = model(image)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(model.features[1].block[0][0].weight.grad).all()


def test_relu6_swap() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Conv2d(4, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(64, 2))
    quantize_model(net, QuantConfig(method="gdrq", skip=[]))
    assert isinstance(net[1], QuantReLU6) and net[1].act_quantizer.upper == 6.0
    out = net.train()(torch.randn(2, 3, 8, 8) * 10)
    assert torch.isfinite(out).all()
    assert float(net[1].act_quantizer.threshold()) <= 6.0


def test_vgg11_bn_forward() -> None:
    model = torchvision.models.vgg11_bn(num_classes=10)
    assert default_skip(model) == ["features.0", "classifier.6"]
    # the 25088x4096 classifier would dominate the run time; the conv/BN/ReLU body is the point
    quantize_model(model, QuantConfig(method="gdrq", skip=["features.0", "classifier"]))
    assert float_layers(model, nn.Conv2d) == ["features.0"] and len(float_layers(model, nn.Linear)) == 3
    assert isinstance(model.features[4], QuantConv2d) and isinstance(model.features[2], QuantReLU)
    with torch.no_grad():
        out = model.train()(torch.randn(2, 3, 32, 32))  # train mode: BN batch stats, EMA initialised
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_timm_resnet18(image: torch.Tensor) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    quantize_model(model, QuantConfig(method="gdrq", groups=4))
    assert float_layers(model, nn.Conv2d) == ["conv1"] and float_layers(model, nn.Linear) == ["fc"]
    assert isinstance(model.layer1[0].conv1, QuantConv2d) and isinstance(model.layer1[0].act1, QuantReLU)
    out = model(image)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(model.layer1[0].conv1.weight.grad).all()


def test_quantizers_of_every_layer_are_switched_on() -> None:
    model = quantize_model(resnet18(), QuantConfig(method="gdrq", groups=2))
    qs = [m for m in model.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    assert qs and all(all(q.is_on(s) for s in q.switch_names) for q in qs)
    assert all(bool(getattr(q, s)) for q in qs for s in q.switch_names)  # buffers agree with the mirror
