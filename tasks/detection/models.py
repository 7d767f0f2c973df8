"""Faster R-CNN builders: a small name -> builder registry over torchvision parts.

Normalisation choice (every task decides how quantization treats ``FrozenBatchNorm2d``).
torchvision's detectors put ``FrozenBatchNorm2d``
in the backbone whenever they start from pretrained weights. We default to plain
``nn.BatchNorm2d`` (``norm="batchnorm"``) instead, pretrained or not, because

* quantization changes every conv's output distribution, so the BN statistics
  must be able to follow it during QAT (frozen ImageNet statistics cannot);
* the quantization schedule owns BN: its ``freeze_bn`` phase freezes the
  statistics late in training, which gives FrozenBN's stability for the last
  epochs without fixing the pre-quantization statistics for good;
* export folds the per-group weight steps into the following BatchNorm
  (docs/methods.md#group-quantization), a ``FrozenBatchNorm2d`` as well; what a frozen one
  cannot do is follow the quantized network before ``freeze_bn``.

The ResNets are torchvision's own (plain ``BasicBlock`` / ``Bottleneck``). Their blocks
call one ``self.relu`` two or three times; ``quantize_model`` gives each call site its own
quantized activation (``relu``, ``relu2`` for the Bottleneck's middle one, ``relu_out``
after the residual add), so the mid-block and post-residual activations keep separate
clip thresholds although their means differ 2-3x (measured on the digits-COCO FP32
model: e.g. 0.33 vs 1.00 in ``layer1.1``).

``norm="frozen"`` restores torchvision's behaviour (for fine-tuning a pretrained
backbone with tiny per-GPU batches); its statistics never move and the
``freeze_bn`` phase then has nothing to do. With BN and small per-GPU batches
use ``trainer.sync_batchnorm: true`` under DDP.

``fasterrcnn_timm/<name>_fpn`` puts the same FPN over any timm CNN's last four stages
(:class:`tasks.timm_backbones.TimmFPN`); only ``trainable_layers=5`` (all trainable).

``pretrained_backbone`` is a local file with the *classification* state dict of the
backbone (``resnet50``, ``resnet18``, ``mobilenet_v3_large`` or the timm model), or
``imagenet`` for the published weights (:mod:`tasks.hub`); :func:`backbone_weights` names
the classifier and maps its keys onto the built backbone body, which
``DetectionModule.load_pretrained`` loads in ``setup``.
"""
from __future__ import annotations

from typing import Callable, Literal

import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from tasks.timm_backbones import PREFIX, TimmFPN, feature_key_map, parse_arch

NormName = Literal["batchnorm", "frozen"]

RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def _norm_layer(norm: str) -> Callable[..., nn.Module] | None:
    if norm == "batchnorm":
        return None  # each torchvision net's own BatchNorm2d (MobileNetV3: eps=1e-3, momentum=0.01)
    if norm == "frozen":
        return FrozenBatchNorm2d
    raise ValueError(f"norm={norm!r} is not one of: batchnorm, frozen")


def resnet_fpn(name: str, *, trainable_layers: int, fpn_channels: int, norm: str) -> BackboneWithFPN:
    """ResNet + FPN (4 levels + max-pool level), as ``resnet_fpn_backbone`` with a free FPN width."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers={trainable_layers} must be in 0..5 for {name}")
    block, layers = RESNETS[name]
    net = ResNet(block, layers, norm_layer=_norm_layer(norm))  # = torchvision.models.<name>
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for pname, p in net.named_parameters():
        if not any(pname.startswith(t) for t in train):
            p.requires_grad_(False)
    stage2 = net.inplanes // 8
    return BackboneWithFPN(
        net, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)}, [stage2 * 2 ** (k - 1) for k in (1, 2, 3, 4)],
        fpn_channels, extra_blocks=LastLevelMaxPool(),
    )


def mobilenet_v3_fpn(*, trainable_layers: int, fpn_channels: int, norm: str) -> BackboneWithFPN:
    """MobileNetV3-Large features + FPN on the last two stages (+ max-pool level), as torchvision."""
    net = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=_norm_layer(norm))
    features = net.features
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    if not 0 <= trainable_layers <= len(stages):
        raise ValueError(f"trainable_layers={trainable_layers} must be in 0..{len(stages)} for mobilenet_v3_large")
    freeze_before = len(features) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    for block in features[:freeze_before]:
        block.requires_grad_(False)
    returned = [len(stages) - 2, len(stages) - 1]
    return BackboneWithFPN(
        features, {str(stages[k]): str(v) for v, k in enumerate(returned)},
        [features[stages[k]].out_channels for k in returned], fpn_channels, extra_blocks=LastLevelMaxPool(),
    )


def _r50(**kw) -> BackboneWithFPN:
    return resnet_fpn("resnet50", **kw)


def _r18(**kw) -> BackboneWithFPN:
    return resnet_fpn("resnet18", **kw)


# name -> (backbone builder, number of feature maps the RPN sees)
ARCHS: dict[str, tuple[Callable[..., BackboneWithFPN], int]] = {
    "fasterrcnn_resnet50_fpn": (_r50, 5),
    "fasterrcnn_resnet18_fpn": (_r18, 5),
    "fasterrcnn_mobilenet_v3_large_fpn": (mobilenet_v3_fpn, 3),
}


def _resnet_body_key(key: str) -> str | None:
    return None if key.startswith("fc.") else key  # the body is the ResNet without its classifier


def _mobilenet_body_key(key: str) -> str | None:
    return key.removeprefix("features.") if key.startswith("features.") else None  # the body is ``features``


# arch -> (torchvision classifier whose weights ``pretrained_backbone`` holds, its key -> body key)
BACKBONE_KEYS: dict[str, tuple[str, Callable[[str], str | None]]] = {
    "fasterrcnn_resnet50_fpn": ("resnet50", _resnet_body_key),
    "fasterrcnn_resnet18_fpn": ("resnet18", _resnet_body_key),
    "fasterrcnn_mobilenet_v3_large_fpn": ("mobilenet_v3_large", _mobilenet_body_key),
}


def timm_name(arch: str) -> str | None:
    """The timm model of ``fasterrcnn_timm/<name>_fpn``, else None."""
    return parse_arch(arch, "fasterrcnn", "_fpn")


def _timm_fpn(name: str, *, trainable_layers: int, fpn_channels: int, norm: str) -> nn.Module:
    if trainable_layers != 5:
        raise ValueError(f"trainable_layers={trainable_layers}: timm backbones train all layers (5)")
    _norm_layer(norm)  # checks the name
    backbone = TimmFPN(name, fpn_channels=fpn_channels)
    if norm == "frozen":
        from timm.layers import freeze_batch_norm_2d

        backbone.body = freeze_batch_norm_2d(backbone.body)
    return backbone


def known_archs() -> str:
    return ", ".join([*sorted(ARCHS), f"fasterrcnn_{PREFIX}<name>_fpn"])


def backbone_weights(arch: str, body: nn.Module) -> tuple[str, Callable[[str], str | None]]:
    """The classifier whose weights fit ``arch``'s backbone body (torchvision name or ``timm/<name>``),
    and its key -> body key map."""
    name = timm_name(arch)
    if name is not None:
        return PREFIX + name, feature_key_map(body)
    return BACKBONE_KEYS[arch]


def anchor_generator(arch: str, sizes: list[int], aspect_ratios: list[float]) -> AnchorGenerator:
    """ResNet/timm-FPN: one size per level (5 sizes); MobileNet-FPN: every size on each of 3 levels."""
    levels = 5 if timm_name(arch) else ARCHS[arch][1]
    if levels == 5:
        if len(sizes) != levels:
            raise ValueError(f"{arch} has {levels} feature levels: anchor_sizes needs {levels} values, got {sizes}")
        per_level = tuple((int(s),) for s in sizes)
    else:
        per_level = (tuple(int(s) for s in sizes),) * levels
    return AnchorGenerator(per_level, (tuple(float(a) for a in aspect_ratios),) * levels)


class BoxHead(TwoMLPHead):
    """torchvision's ``TwoMLPHead`` (same parameters and keys) with its ReLUs as modules, which
    ``F.relu`` is not: the quantization swap gives each one an activation quantizer, so fc7 reads
    fc6's quantized output and both export as integer kernels."""

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__(in_channels, representation_size)
        self.relu6 = nn.ReLU()
        self.relu7 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu7(self.fc7(self.relu6(self.fc6(x.flatten(start_dim=1)))))


def build_faster_rcnn(
    arch: str,
    *,
    num_classes: int,
    min_size: int,
    max_size: int,
    anchor_sizes: list[int],
    aspect_ratios: list[float],
    trainable_layers: int,
    fpn_channels: int,
    representation_size: int,
    norm: str,
    **detector_kwargs,
) -> FasterRCNN:
    """A torchvision ``FasterRCNN`` for ``arch`` (see :data:`ARCHS`) with random weights.

    Raises:
        ValueError: unknown ``arch`` (the message lists the known names) or bad sizes.
    """
    name = timm_name(arch)
    if arch not in ARCHS and name is None:
        raise ValueError(f"arch={arch!r} is not one of: {known_archs()}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must count the background too (>= 2)")
    if name is not None:
        backbone = _timm_fpn(name, trainable_layers=trainable_layers, fpn_channels=fpn_channels, norm=norm)
    else:
        backbone = ARCHS[arch][0](trainable_layers=trainable_layers, fpn_channels=fpn_channels, norm=norm)
    if representation_size < 1 or fpn_channels < 1:
        raise ValueError(f"fpn_channels={fpn_channels} and representation_size={representation_size} must be >= 1")
    resolution = 7  # FasterRCNN's default MultiScaleRoIAlign output size
    return FasterRCNN(
        backbone, min_size=min_size, max_size=max_size,
        rpn_anchor_generator=anchor_generator(arch, anchor_sizes, aspect_ratios),
        box_head=BoxHead(fpn_channels * resolution**2, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes), **detector_kwargs,
    )


def first_conv_name(model: nn.Module, under: str = "backbone.body") -> str:
    """Dotted name of the first ``nn.Conv2d`` below ``under`` (the stem conv kept full precision)."""
    root = model.get_submodule(under)
    for name, module in root.named_modules():
        if type(module) is nn.Conv2d:
            return f"{under}.{name}"
    raise ValueError(f"no nn.Conv2d below {under!r}")
