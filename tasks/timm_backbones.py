"""timm feature extractors as detection / segmentation backbones (``arch`` names with ``timm/<name>``).

``timm.create_model(name, features_only=True)`` gives any timm CNN as a module that returns
its stage outputs; detection puts an FPN over the last four (strides 4-32), FCN / PSPNet
take the last two at output stride 8 (timm dilates the last stages). The modules are
timm's own layers (``nn.Conv2d``, ``nn.ReLU`` / ``nn.SiLU`` ...), so ``quantize_model``
swaps their convolutions and ReLUs like the torchvision backbones'.

A feature extractor flattens top-level ``nn.Sequential`` children (``stem.0`` becomes
``stem_0``); :func:`feature_key_map` maps a plain timm model's state-dict keys (what timm's
pretrained weights hold) onto it, dropping the classifier.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

PREFIX = "timm/"


def parse_arch(arch: str, head: str, suffix: str = "") -> str | None:
    """The timm model name in ``<head>_timm/<name><suffix>``, or None for other arch names."""
    start = f"{head}_{PREFIX}"
    if arch.startswith(start) and arch.endswith(suffix) and len(arch) > len(start) + len(suffix):
        return arch[len(start):len(arch) - len(suffix)]
    return None


def features(name: str, *, out_indices: tuple[int, ...], output_stride: int | None = None) -> nn.Module:
    """timm's feature extractor of ``name`` (random weights).

    Raises:
        ValueError: unknown timm model, or one that cannot give these features.
    """
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    kwargs = {"output_stride": output_stride} if output_stride else {}
    try:
        return timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as e:
        raise ValueError(f"timm model {name!r} cannot serve as a backbone here ({e})") from None


def first_conv(name: str) -> str:
    """Name of the first ``nn.Conv2d`` in ``name``'s feature extractor (built on the meta device)."""
    with torch.device("meta"):
        body = features(name, out_indices=(-1,))
    return next(n for n, m in body.named_modules() if type(m) is nn.Conv2d)


def feature_key_map(body: nn.Module) -> Callable[[str], str | None]:
    """Plain timm key -> feature-extractor key (``stem.0.w`` -> ``stem_0.w``); None for the rest (the head)."""
    children = {n for n, _ in body.named_children()}

    def key_map(key: str) -> str | None:
        parts = key.split(".")
        if len(parts) > 2 and f"{parts[0]}_{parts[1]}" in children:
            return ".".join([f"{parts[0]}_{parts[1]}", *parts[2:]])
        return key if parts[0] in children else None

    return key_map


class TimmFPN(nn.Module):
    """timm features at strides 4, 8, 16, 32 -> torchvision FPN (+ a max-pool level): 5 maps.

    Same layout as torchvision's ``BackboneWithFPN`` (``body``, ``fpn``, ``out_channels``).
    """

    def __init__(self, name: str, *, fpn_channels: int) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = features(name, out_indices=(-4, -3, -2, -1))
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), fpn_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class TimmDilated(nn.Module):
    """The last two timm stages at output stride 8, as ``{"out": last, "aux": second to last}``."""

    def __init__(self, name: str, *, aux: bool = True) -> None:
        super().__init__()
        self.body = features(name, out_indices=(-2, -1), output_stride=8)
        self.aux = aux
        self.channels: tuple[int, int] = tuple(self.body.feature_info.channels())  # type: ignore[assignment]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        c3, c4 = self.body(x)
        return OrderedDict(out=c4, aux=c3) if self.aux else OrderedDict(out=c4)
