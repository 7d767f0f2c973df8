"""Classifier builders by name: torchvision (``resnet18``) or timm (``timm/resnet18``).

Weights come only from local files (``pretrained=PATH``); nothing is downloaded.
"""
from __future__ import annotations

import warnings

import torch
import torchvision
from torch import nn


def build_classifier(name: str, *, num_classes: int, pretrained: str | None = None, small_input: bool = False) -> nn.Module:
    """Build a classifier by name with ``num_classes`` outputs and no hub weights.

    Args:
        name: a torchvision model name (``resnet18``, ``mobilenet_v3_small``, ...) or
            ``timm/<name>`` for any timm model.
        num_classes: output classes.
        pretrained: path of a local state dict (or Lightning checkpoint) to start from;
            tensors whose shape differs (e.g. the classifier) are skipped with a warning.
        small_input: CIFAR-style stem for ResNets (3x3 stride-1 first conv, no max-pool).

    Raises:
        ValueError: unknown model name (the message lists where to find valid names).
        FileNotFoundError: ``pretrained`` does not exist.
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
    if pretrained:
        load_local_weights(model, pretrained)
    return model


def _cifar_stem(model: nn.Module, name: str) -> None:
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(f"small_input=True supports ResNet-style models with conv1 + maxpool, not {name!r}")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def load_local_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict (plain or inside a Lightning checkpoint) with ``weights_only=True``."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    if not usable:
        raise ValueError(f"pretrained file {path} shares no tensor names/shapes with the model")
    if skipped:
        warnings.warn(f"pretrained: skipped {len(skipped)} tensors with other names or shapes, e.g. {skipped[:3]}")
    model.load_state_dict(usable, strict=False)
