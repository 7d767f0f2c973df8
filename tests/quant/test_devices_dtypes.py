"""Quantizers follow the model's device and keep their statistics in float32 whatever the
compute dtype; learned clips/steps stay in the autograd graph while switched off (DDP)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from gdrq_lightning import Method, QuantConfig, quantize_model, set_quant_state
from gdrq_lightning.quant import ActQuantizer

METHODS = [m.value for m in Method if m != Method.none]


def test_quantize_model_puts_activation_quantizers_on_the_model_device() -> None:
    model = torchvision.models.resnet18(num_classes=10).to("meta")  # the non-CPU branch, as on CUDA
    quantize_model(model, QuantConfig(method="gdrq"))
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert devices == {"meta"}


@pytest.mark.parametrize("method", METHODS)
def test_bf16_true_trains_with_fp32_statistics_and_bf16_outputs(method: str) -> None:
    bits = 1 if method == "hwgq" else 4
    model = quantize_model(torchvision.models.resnet18(num_classes=10), QuantConfig(method=method, weight_bits=bits, act_bits=2))
    model = model.to(torch.bfloat16).train()  # what Lightning's bf16-true does
    x = torch.randn(4, 3, 32, 32, dtype=torch.bfloat16)
    for _ in range(2):
        out = model(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    for q in acts:
        for name, buf in q.named_buffers():
            if buf.is_floating_point():
                assert buf.dtype == torch.float32, name
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("method", ["pact", "lsq"])
def test_bf16_autocast_keeps_activation_outputs_in_bf16(method: str) -> None:
    q = ActQuantizer(QuantConfig(method=method, act_bits=4)).train()
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16  # no promotion to the fp32 parameter's dtype


@pytest.mark.parametrize("method", ["pact", "lsq"])
def test_switched_off_learned_parameters_get_a_zero_gradient(method: str) -> None:
    model = quantize_model(torchvision.models.resnet18(num_classes=10), QuantConfig(method=method, act_bits=4))
    set_quant_state(model, scale_clip=False, quant_weights=False, quant_acts=False, groups=False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    learned = {n: p for n, p in model.named_parameters() if "quantizer" in n}
    assert learned and all(p.grad is not None and not p.grad.any() for p in learned.values())
