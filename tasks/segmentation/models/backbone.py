"""Dilated ResNet backbones (output stride 8) returning ``layer3`` and ``layer4`` features.

torchvision's ``replace_stride_with_dilation`` only works for Bottleneck ResNets
(50/101); ResNet-18's ``BasicBlock`` refuses dilation, so :func:`dilate_layer` turns the
strides of ``layer3``/``layer4`` into dilations in place, as the PSPNet / mmseg
reference code does (every 3x3 conv of a dilated stage gets the stage's dilation).
"""
from __future__ import annotations

from pathlib import Path

import torch
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


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: a plain state dict or a checkpoint with ``state_dict``.

    Raises:
        FileNotFoundError: ``path`` does not exist (no download is ever attempted).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist (pretrained weights are local paths only)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__})")
    return state


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load ImageNet ResNet weights (torchvision key names) into a backbone; ``fc.*`` is dropped.

    Raises:
        ValueError: the file's keys do not match the backbone (first few listed).
    """
    state = {k: v for k, v in load_state_file(path).items() if not k.startswith(("fc.", "num_batches_tracked"))}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]  # the classifier is not part of the backbone
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {str(path)!r} do not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def dilated_resnet(
    depth: str, *, pretrained_backbone: str | Path | None = None, aux: bool = True
) -> tuple[IntermediateLayerGetter, int, int]:
    """Output-stride-8 ResNet returning ``{"out": layer4, "aux": layer3}``.

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
    if pretrained_backbone is not None:
        load_backbone_weights(net, pretrained_backbone)
    layers = {"layer4": "out", "layer3": "aux"} if aux else {"layer4": "out"}
    c3, c4 = CHANNELS[depth]
    return IntermediateLayerGetter(net, return_layers=layers), c3, c4
