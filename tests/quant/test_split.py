"""One activation quantizer per call site: torchvision ResNet blocks are split, other reuse is refused."""
from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
import torchvision
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model, quantized_layers
from gdrq_lightning.quant import QuantReLU


def act_calls(model: nn.Module, x: torch.Tensor) -> Counter:
    calls: Counter = Counter()
    hooks = [
        m.act_quantizer.register_forward_hook(lambda *_a, name=n: calls.update([name]))
        for n, m in model.named_modules()
        if isinstance(m, QuantReLU)
    ]
    model(x)
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_every_activation_quantizer_of_a_torchvision_resnet_runs_once(arch: str) -> None:
    model = quantize_model(getattr(torchvision.models, arch)(num_classes=10), QuantConfig(method="gdrq"))
    acts = [n for n, m in model.named_modules() if isinstance(m, QuantReLU)]
    blocks = 8 if arch == "resnet18" else 16
    per_block = 2 if arch == "resnet18" else 3
    assert len(acts) == 1 + blocks * per_block
    calls = act_calls(model.train(), torch.randn(2, 3, 32, 32))
    assert set(calls) == set(acts) and set(calls.values()) == {1}
    assert {"layer1.0.relu", "layer1.0.relu_out"} <= set(acts)


def test_split_keeps_float_outputs_and_state_dict_keys() -> None:
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(num_classes=10).eval()
    model = torchvision.models.resnet50(num_classes=10).eval()
    model.load_state_dict(ref.state_dict())
    quantize_model(model, QuantConfig(method="gdrq", skip=["*"]))  # split, nothing quantized
    assert not quantized_layers(model)
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)


def test_split_gives_separate_statistics() -> None:
    model = quantize_model(torchvision.models.resnet18(num_classes=10), QuantConfig(method="gdrq")).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    block = model.layer1[0]
    mid, out = block.relu.act_quantizer.running_abs_mean, block.relu_out.act_quantizer.running_abs_mean
    assert block.relu.act_quantizer is not block.relu_out.act_quantizer
    assert float(mid) > 0 and float(out) > 0 and not torch.equal(mid, out)


def test_timm_resnet_has_one_module_per_site_already() -> None:
    model = quantize_model(timm.create_model("resnet18", num_classes=10), QuantConfig(method="gdrq"))
    calls = act_calls(model.train(), torch.randn(2, 3, 32, 32))
    assert len(calls) == 17 and set(calls.values()) == {1}


class ReusesReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


def test_a_reused_activation_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'act' \(2 calls\).*QuantConfig.skip"):
        quantize_model(ReusesReLU(), QuantConfig(method="gdrq", skip=[]))


def test_a_skipped_reused_activation_is_fine() -> None:
    model = quantize_model(ReusesReLU(), QuantConfig(method="gdrq", skip=["act"]))
    assert {n for n, _ in quantized_layers(model)} == {"conv1", "conv2", "conv3"}


class SharedRegistration(nn.Module):
    """One ReLU object registered under two names, called once through each."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
        self.b.append(self.a[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_an_activation_registered_twice_gets_a_quantizer_per_name() -> None:
    model = quantize_model(SharedRegistration(), QuantConfig(method="gdrq", skip=[]))
    assert model.a[1] is not model.b[1]
    assert isinstance(model.a[1], QuantReLU) and isinstance(model.b[1], QuantReLU)
    calls = act_calls(model.train(), torch.randn(1, 3, 8, 8))
    assert calls == Counter({"a.1": 1, "b.1": 1})


def test_shared_conv_keeps_one_quantized_layer() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), conv, nn.ReLU(), conv, nn.ReLU())
    quantize_model(model, QuantConfig(method="gdrq", skip=[]))
    assert model[1] is model[3] and model[2] is not model[4]


class CachesInForward(nn.Module):
    """Keeps a value computed from its input, as torchvision's MultiScaleRoIAlign does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.cached = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached is None:
            self.cached = x.shape[-1]
        return self.relu(self.conv(x))


def test_the_reuse_check_leaves_no_trace_in_the_model() -> None:
    model = quantize_model(CachesInForward(), QuantConfig(method="gdrq", skip=[]))
    assert model.cached is None
    model(torch.randn(1, 3, 8, 8))
    assert model.cached == 8
