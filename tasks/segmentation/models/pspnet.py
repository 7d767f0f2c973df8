"""PSPNet (Zhao et al., CVPR 2017) on a dilated ResNet (output stride 8).

Layout mirrors torchvision's segmentation models so one LightningModule drives both:
``backbone`` (an ``IntermediateLayerGetter``), ``classifier`` (the PSP head) and
``aux_classifier`` (an FCN head on ``layer3``); ``forward`` returns
``{"out": logits}`` plus ``"aux"`` in training mode, both upsampled to the input size.

Batch norm in the 1x1 bin: the global-pooled branch has one value per channel and
image, so ``BatchNorm2d`` in training mode fails for a batch of one ("Expected more
than 1 value per channel") and is very noisy for small batches. That branch is
``conv(bias) -> ReLU`` without BN; the 2x2, 3x3 and 6x6 bins keep BN (4+ values per
channel). The training loader also drops its last incomplete batch.
All activations are ``nn.ReLU`` modules so the quantizer can swap them.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.segmentation.fcn import FCNHead


class PyramidPooling(nn.Module):
    """Pool to ``b x b`` for each bin, reduce channels, upsample back and concatenate with the input.

    Output channels: ``in_channels + len(bins) * (in_channels // len(bins))``.
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        channels = in_channels // len(bins)
        stages = []
        for b in bins:
            if b == 1:  # no BN on the global bin, see the module docstring
                layers = [nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=True), nn.ReLU()]
            else:
                layers = [
                    nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, channels, 1, bias=False),
                    nn.BatchNorm2d(channels), nn.ReLU(),
                ]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_channels = in_channels + len(bins) * channels

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Sequential):
    """Pyramid pooling -> 3x3 conv + BN + ReLU -> dropout -> 1x1 classifier (``cls``)."""

    def __init__(self, in_channels: int, num_classes: int, *, bins: Sequence[int] = (1, 2, 3, 6),
                 channels: int = 512, dropout: float = 0.1) -> None:
        ppm = PyramidPooling(in_channels, bins)
        super().__init__(OrderedDict([
            ("ppm", ppm),
            ("conv", nn.Conv2d(ppm.out_channels, channels, 3, padding=1, bias=False)),
            ("bn", nn.BatchNorm2d(channels)),
            ("relu", nn.ReLU()),
            ("dropout", nn.Dropout2d(dropout)),
            ("cls", nn.Conv2d(channels, num_classes, 1)),
        ]))


class PSPNet(nn.Module):
    """PSPNet: backbone features -> PSP head; optional FCN auxiliary head on ``layer3``.

    Args:
        backbone: returns ``{"out": layer4}`` and, with an aux head, ``"aux": layer3``.
        classifier: the :class:`PSPHead`.
        aux_classifier: head on the ``aux`` feature, run in training mode only.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        result = OrderedDict(out=F.interpolate(self.classifier(features["out"]), size=size, mode="bilinear",
                                               align_corners=False))
        if self.aux_classifier is not None and self.training:
            aux = self.aux_classifier(features["aux"])
            result["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return result


def build_pspnet(backbone: nn.Module, c3: int, c4: int, *, num_classes: int, aux_loss: bool,
                 channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> PSPNet:
    """Assemble a :class:`PSPNet` from a dilated backbone with ``layer3``/``layer4`` widths ``c3``/``c4``."""
    head = PSPHead(c4, num_classes, bins=bins, channels=channels)
    return PSPNet(backbone, head, FCNHead(c3, num_classes) if aux_loss else None)
