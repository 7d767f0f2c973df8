"""Segmentation model registry: ``arch`` name -> keyword-only builder (timm-style).

Every model returns ``{"out": logits[N, C, H, W]}`` at the input resolution and, in
training mode with an auxiliary head, ``"aux"`` as well (:class:`MainOutput` keeps the
main map alone, for export). ``QUANT_SKIP`` lists, per arch, the layers kept full
precision by default: the first backbone conv and the final 1x1 classifier convs of the
main and auxiliary heads. Builders start from random weights; ``BACKBONES`` names the
torchvision classifier whose ImageNet weights fit each arch's backbone.

``fcn_timm/<name>`` and ``pspnet_timm/<name>`` put the same heads on any timm CNN whose
last two stages timm can run at output stride 8 (:class:`tasks.timm_backbones.TimmDilated`).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torchvision.models.segmentation import fcn_resnet50, fcn_resnet101
from torchvision.models.segmentation.fcn import FCN, FCNHead

from tasks.timm_backbones import PREFIX, TimmDilated, feature_key_map, first_conv, parse_arch

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


def _timm(arch: str) -> tuple[str, str] | None:
    """``(head, timm name)`` of ``fcn_timm/<name>`` / ``pspnet_timm/<name>``, else None."""
    for head in ("fcn", "pspnet"):
        name = parse_arch(arch, head)
        if name is not None:
            return head, name
    return None


def _unknown(arch: str) -> ValueError:
    return ValueError(f"unknown segmentation arch {arch!r}; known: {', '.join(MODELS)}, fcn_{PREFIX}<name>, "
                      f"pspnet_{PREFIX}<name>")


def build_model(arch: str, *, num_classes: int, aux_loss: bool = True) -> nn.Module:
    """Build ``arch`` with random weights.

    Raises:
        ValueError: unknown ``arch`` (the message lists the known names).
    """
    timm_arch = _timm(arch)
    if timm_arch is not None:
        head, name = timm_arch
        backbone = TimmDilated(name, aux=aux_loss)
        c3, c4 = backbone.channels
        if head == "fcn":
            return FCN(backbone, FCNHead(c4, num_classes), FCNHead(c3, num_classes) if aux_loss else None)
        return build_pspnet(backbone, c3, c4, num_classes=num_classes, aux_loss=aux_loss, channels=256)
    if arch not in MODELS:
        raise _unknown(arch)
    return MODELS[arch](num_classes=num_classes, aux_loss=aux_loss)


def quant_skip(arch: str, aux_loss: bool = True) -> list[str]:
    """Default full-precision layers of ``arch`` (see module docstring)."""
    timm_arch = _timm(arch)
    if timm_arch is not None:
        head, name = timm_arch
        patterns = [f"backbone.body.{first_conv(name)}", *(_PSP_SKIP if head == "pspnet" else _FCN_SKIP)[1:]]
    elif arch in QUANT_SKIP:
        patterns = QUANT_SKIP[arch]
    else:
        raise _unknown(arch)
    return [p for p in patterns if aux_loss or not p.startswith("aux_classifier")]


def backbone_weights(arch: str, model: nn.Module) -> tuple[nn.Module, str, Callable[[str], str | None]]:
    """Where ``pretrained_backbone`` loads: the module, the classifier whose weights fit it
    (torchvision name or ``timm/<name>``) and its key map."""
    timm_arch = _timm(arch)
    if timm_arch is not None:
        body = model.backbone.body
        return body, PREFIX + timm_arch[1], feature_key_map(body)
    return model.backbone, BACKBONES[arch], backbone_key


class MainOutput(nn.Module):
    """``model(x)["out"]``: the main map as one tensor, what export needs (``"aux"`` is dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


__all__ = [
    "BACKBONES", "MODELS", "MainOutput", "PSPHead", "PSPNet", "PyramidPooling", "QUANT_SKIP", "backbone_key",
    "backbone_weights", "build_model", "fcn_resnet18", "quant_skip",
]
