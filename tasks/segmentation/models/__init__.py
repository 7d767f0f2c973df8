"""Segmentation model registry: ``arch`` name -> keyword-only builder (timm-style).

Every model returns ``{"out": logits[N, C, H, W]}`` at the input resolution and, in
training mode with an auxiliary head, ``"aux"`` as well (:class:`MainOutput` keeps the
main map alone, for export). ``QUANT_SKIP`` lists, per arch, the layers kept full
precision by default: the first backbone conv and the final 1x1 classifier convs of the
main and auxiliary heads. Builders start from random weights; ``BACKBONES`` names the
torchvision classifier whose ImageNet weights fit each arch's backbone.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torchvision.models.segmentation import fcn_resnet50, fcn_resnet101
from torchvision.models.segmentation.fcn import FCN, FCNHead

from .backbone import backbone_key, dilated_resnet
from .pspnet import PSPHead, PSPNet, PyramidPooling, build_pspnet

Builder = Callable[..., nn.Module]


def _fcn_torchvision(factory: Callable[..., FCN]) -> Builder:
    def build(*, num_classes: int, aux_loss: bool = True) -> nn.Module:
        return factory(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)

    return build


def fcn_resnet18(*, num_classes: int, aux_loss: bool = True) -> FCN:
    """FCN head on a dilated (output stride 8) ResNet-18, torchvision's FCN class."""
    backbone, c3, c4 = dilated_resnet("resnet18", aux=aux_loss)
    return FCN(backbone, FCNHead(c4, num_classes), FCNHead(c3, num_classes) if aux_loss else None)


def _pspnet(depth: str, channels: int) -> Builder:
    def build(*, num_classes: int, aux_loss: bool = True) -> PSPNet:
        backbone, c3, c4 = dilated_resnet(depth, aux=aux_loss)
        return build_pspnet(backbone, c3, c4, num_classes=num_classes, aux_loss=aux_loss, channels=channels)

    build.__doc__ = f"PSPNet on a dilated {depth} (bins 1, 2, 3, 6; {channels}-channel bottleneck)."
    return build


MODELS: dict[str, Builder] = {
    "fcn_resnet18": fcn_resnet18,
    "fcn_resnet50": _fcn_torchvision(fcn_resnet50),
    "fcn_resnet101": _fcn_torchvision(fcn_resnet101),
    "pspnet_resnet18": _pspnet("resnet18", 256),
    "pspnet_resnet50": _pspnet("resnet50", 512),
}

_FCN_SKIP = ["backbone.conv1", "classifier.4", "aux_classifier.4"]
_PSP_SKIP = ["backbone.conv1", "classifier.cls", "aux_classifier.4"]
QUANT_SKIP: dict[str, list[str]] = {name: _PSP_SKIP if name.startswith("pspnet") else _FCN_SKIP for name in MODELS}
BACKBONES: dict[str, str] = {name: name.rpartition("_")[2] for name in MODELS}  # e.g. pspnet_resnet50 -> resnet50


def build_model(arch: str, *, num_classes: int, aux_loss: bool = True) -> nn.Module:
    """Build ``arch`` with random weights.

    Raises:
        ValueError: unknown ``arch`` (the message lists the known names).
    """
    if arch not in MODELS:
        raise ValueError(f"unknown segmentation arch {arch!r}; known: {', '.join(MODELS)}")
    return MODELS[arch](num_classes=num_classes, aux_loss=aux_loss)


def quant_skip(arch: str, aux_loss: bool = True) -> list[str]:
    """Default full-precision layers of ``arch`` (see module docstring)."""
    if arch not in QUANT_SKIP:
        raise ValueError(f"unknown segmentation arch {arch!r}; known: {', '.join(MODELS)}")
    return [p for p in QUANT_SKIP[arch] if aux_loss or not p.startswith("aux_classifier")]


class MainOutput(nn.Module):
    """``model(x)["out"]``: the main map as one tensor, what export needs (``"aux"`` is dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


__all__ = [
    "BACKBONES", "MODELS", "MainOutput", "PSPHead", "PSPNet", "PyramidPooling", "QUANT_SKIP", "backbone_key",
    "build_model", "fcn_resnet18", "quant_skip",
]
