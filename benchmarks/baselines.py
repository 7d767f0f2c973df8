"""Model builders shared by the benchmark scripts: FP32, ours, torch.ao QAT, Brevitas.

Every builder starts from the same torchvision network built with the same seed, so
the variants differ only in how they quantize. Ours uses the public API
(``quantize_model`` with everything switched on); the baselines follow their own
documentation:

* torch.ao eager-mode QAT: torchvision's *quantizable* model (QuantStub/DeQuantStub,
  ``FloatFunctional`` adds), ``fuse_model(is_qat=True)`` in train mode, the default
  ``x86`` QAT qconfig (8-bit, per-channel symmetric weights; activations 0..127
  because x86/fbgemm use ``reduce_range``), ``prepare_qat``. The FP32 weights are
  loaded before fusing, so the initial network equals the FP32 one.
* Brevitas: ``nn.Conv2d`` -> ``QuantConv2d``, ``nn.Linear`` -> ``QuantLinear``,
  ``nn.ReLU`` -> ``QuantReLU`` with the default Brevitas quantizers at the requested
  bit widths (per-tensor float scales; weights from max|w|, activations a learned
  scale initialised from statistics). The new layers share the float Parameters.
  The first conv and the last linear stay float, as in our default ``skip``.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable

import torch
import torchvision
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model
from gdrq_lightning.utils.modules import set_submodule

MODELS = ("resnet18", "mobilenet_v3_small")


def brevitas_available() -> bool:
    """True when ``import brevitas`` would work (it is an optional benchmark extra)."""
    return importlib.util.find_spec("brevitas") is not None


BREVITAS_MISSING = "note: Brevitas is not installed (pip install brevitas); its rows are skipped"


def build_fp32(name: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """The float torchvision network, initialised from ``seed``."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def build_ours(name: str, config: QuantConfig, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """``quantize_model`` on the FP32 network: everything the config asks for is on."""
    return quantize_model(build_fp32(name, num_classes, seed), config)


def _quantizable(name: str, num_classes: int) -> nn.Module:
    from torchvision.models.quantization import mobilenetv3, resnet

    if name == "resnet18":
        return resnet.resnet18(weights=None, quantize=False, num_classes=num_classes)
    if name == "mobilenet_v3_small":  # torchvision ships only the large builder; same class
        setting, last_channel = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small")
        return mobilenetv3.QuantizableMobileNetV3(
            setting, last_channel, block=mobilenetv3.QuantizableInvertedResidual, num_classes=num_classes
        )
    raise ValueError(f"no quantizable torchvision model for {name!r}; known: {', '.join(MODELS)}")


def build_torch_ao_qat(name: str, num_classes: int = 10, seed: int = 0, backend: str = "x86") -> nn.Module:
    """torch.ao eager-mode QAT model (fused, fake-quant 8-bit), starting from the FP32 weights."""
    import torch.ao.quantization as tq

    model = _quantizable(name, num_classes)
    missing, unexpected = model.load_state_dict(build_fp32(name, num_classes, seed).state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"quantizable {name} differs from the float model: {missing[:3]} {unexpected[:3]}")
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notice of torch.ao.quantization, reduce_range
        model.fuse_model(is_qat=True)
        model.qconfig = tq.get_default_qat_qconfig(backend)
        tq.prepare_qat(model, inplace=True)
    return model


def _first_conv_last_linear(model: nn.Module) -> set[str]:
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    return set(convs[:1] + linears[-1:])


def brevitas_swap(model: nn.Module, weight_bits: int, act_bits: int) -> nn.Module:
    """Swap conv/linear/ReLU for Brevitas layers in place, sharing the Parameters.

    A module used twice (torchvision's BasicBlock ``relu``) maps to one Brevitas
    module, as our ``quantize_model`` does.
    """
    import brevitas.nn as qnn

    skip = _first_conv_last_linear(model)
    swapped: dict[int, nn.Module] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if not name or name in skip or type(m) not in (nn.Conv2d, nn.Linear, nn.ReLU):
            continue
        if id(m) not in swapped:
            if type(m) is nn.Conv2d:
                new: nn.Module = qnn.QuantConv2d(
                    m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, groups=m.groups, bias=m.bias is not None, weight_bit_width=weight_bits,
                )
                new.weight, new.bias = m.weight, m.bias
            elif type(m) is nn.Linear:
                new = qnn.QuantLinear(m.in_features, m.out_features, bias=m.bias is not None, weight_bit_width=weight_bits)
                new.weight, new.bias = m.weight, m.bias
            else:
                new = qnn.QuantReLU(bit_width=act_bits)
            swapped[id(m)] = new.to(next(model.parameters()).device).train(m.training)
        set_submodule(model, name, swapped[id(m)])
    return model


def build_brevitas(name: str, weight_bits: int, act_bits: int, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """The FP32 network with Brevitas ``W{weight_bits}A{act_bits}`` layers."""
    return brevitas_swap(build_fp32(name, num_classes, seed), weight_bits, act_bits)


def step_variants(groups: int) -> dict[str, Callable[[str], nn.Module]]:
    """Variants of the step-overhead benchmark: label -> builder(model_name)."""
    variants: dict[str, Callable[[str], nn.Module]] = {
        "FP32": build_fp32,
        f"ours GDRQ W4A4 G={groups}": lambda n: build_ours(n, QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=groups)),
        "ours HWGQ W1A2": lambda n: build_ours(n, QuantConfig(method="hwgq", weight_bits=1, act_bits=2)),
        "torch.ao QAT W8A8 (x86)": build_torch_ao_qat,
    }
    if brevitas_available():
        variants["Brevitas W4A4"] = lambda n: build_brevitas(n, 4, 4)
    return variants
