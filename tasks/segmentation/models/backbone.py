"""Dilated ResNet backbones (output stride 8) returning ``layer3`` and ``layer4`` features.

torchvision's ``replace_stride_with_dilation`` only works for Bottleneck ResNets
(50/101); ResNet-18's ``BasicBlock`` refuses dilation, so :func:`dilate_layer` turns the
strides of ``layer3``/``layer4`` into dilations in place, as the PSPNet / mmseg
reference code does (every 3x3 conv of a dilated stage gets the stage's dilation).
The backbone keeps torchvision's key names, so ImageNet classifier weights load into it
with :func:`backbone_key` (``SegmentationModule.load_pretrained``).
"""
from __future__ import annotations

from torch import nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter

RESNETS = {"resnet18": resnet.resnet18, "resnet50": resnet.resnet50, "resnet101": resnet.resnet101}
# Channels of (layer3, layer4) per depth.
CHANNELS = {"resnet18": (256, 512), "resnet50": (1024, 2048), "resnet101": (1024, 2048)}


def dilate_layer(layer: nn.Sequential, dilation: int) -> None:
    """Replace the stride-2 downsampling of a BasicBlock stage by ``dilation`` (in place)."""
    for block in layer:
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (dilation, dilation), (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def backbone_key(key: str) -> str | None:
    """A torchvision ResNet classifier key -> the backbone's key (None: the ``fc`` classifier, not in the backbone)."""
    return None if key.startswith("fc.") else key


def dilated_resnet(depth: str, *, aux: bool = True) -> tuple[IntermediateLayerGetter, int, int]:
    """Output-stride-8 ResNet returning ``{"out": layer4, "aux": layer3}``, random weights.

    Returns:
        The backbone, and the channel counts of ``layer3`` and ``layer4``.
    """
    if depth not in RESNETS:
        raise ValueError(f"backbone {depth!r} is not one of: {', '.join(RESNETS)}")
    if depth == "resnet18":
        net = RESNETS[depth](weights=None)
        dilate_layer(net.layer3, 2)
        dilate_layer(net.layer4, 4)
    else:
        net = RESNETS[depth](weights=None, replace_stride_with_dilation=[False, True, True])
    layers = {"layer4": "out", "layer3": "aux"} if aux else {"layer4": "out"}
    c3, c4 = CHANNELS[depth]
    return IntermediateLayerGetter(net, return_layers=layers), c3, c4
