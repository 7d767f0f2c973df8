"""Classifier builders by name: torchvision (``resnet18``) or timm (``timm/resnet18``).

Builders never download: starting weights (a local file, or ``imagenet`` for the published
ones) load in ``ClassificationModule``'s ``setup`` (:mod:`tasks.weights`).
"""
from __future__ import annotations

import torchvision
from torch import nn


def build_classifier(name: str, *, num_classes: int, small_input: bool = False) -> nn.Module:
    """Build a classifier by name with ``num_classes`` outputs and no hub weights.

    Args:
        name: a torchvision model name (``resnet18``, ``mobilenet_v3_small``, ...) or
            ``timm/<name>`` for any timm model.
        num_classes: output classes.
        small_input: CIFAR-style stem for ResNets (3x3 stride-1 first conv, no max-pool).

    Raises:
        ValueError: unknown model name (the message lists where to find valid names).
    """
    if name.startswith("timm/"):
        import timm

        timm_name = name.split("/", 1)[1]
        if not timm.is_model(timm_name):
            raise ValueError(f"unknown timm model {timm_name!r}; see timm.list_models() for valid names")
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    else:
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise ValueError(
                f"unknown model {name!r}; torchvision classifiers: {', '.join(sorted(known)[:12])}, ... "
                f"(or 'timm/<name>' for timm models)"
            )
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if small_input:
        _cifar_stem(model, name)
    return model


def _cifar_stem(model: nn.Module, name: str) -> None:
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(f"small_input=True supports ResNet-style models with conv1 + maxpool, not {name!r}")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
