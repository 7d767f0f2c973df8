"""Layers a bit plan keeps at one bit width (``allocate(..., ties=...)``).

``"auto"`` ties the two convolutions whose outputs meet in a residual add: a block's last conv
and its ``downsample`` conv (torchvision and timm ResNet blocks: ``BasicBlock`` conv2,
``Bottleneck`` conv3; the blocks inside a torchvision Faster R-CNN, FCN or PSPNet backbone
too). The add sums both on one grid: in the deploy form each summand is requantized to its
own 8-bit output grid before the add (QLinearAdd), so ``gdrq export`` runs either way, but an
integer-only runtime that adds the two accumulators before one requantization (HAWQ-V3's
integer residual) needs both summands at one precision, and a plan that gives one summand
8-bit and the other 2-bit weights spends bits the sum cannot show. Identity shortcuts have no
conv to tie; FPN sums are not tied (their lateral convs meet upsampled maps, not a conv).
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

WEIGHTED = (nn.Conv2d, nn.Linear)


def residual_ties(model: nn.Module, layers: Iterable[str]) -> list[list[str]]:
    """Groups ``[last conv of the block, downsample conv(s)]`` among ``layers`` (the counted layers);
    a group with fewer than two counted members is dropped."""
    counted = set(layers)
    groups = []
    for name, block in model.named_modules():
        downsample = getattr(block, "downsample", None)
        if not isinstance(downsample, nn.Module):
            continue
        prefix = f"{name}." if name else ""
        down = [f"{prefix}downsample.{n}" if n else f"{prefix}downsample" for n, m in downsample.named_modules()
                if isinstance(m, WEIGHTED)]
        own = [f"{prefix}{n}" for n, m in block.named_modules() if isinstance(m, nn.Conv2d) and n
               and not n.startswith("downsample") and n.count(".") == 0]
        group = [n for n in own[-1:] + down if n in counted]
        if len(group) > 1:
            groups.append(group)
    return groups


def check_ties(ties: object, layers: list[str], model_ties: list[list[str]] | None) -> list[list[str]]:
    """``ties`` as groups of counted layer names: ``"auto"`` -> ``model_ties`` (found when the report
    was measured), ``"none"`` -> none, or an explicit list of name lists.

    Raises:
        ValueError: another value, or a name that is not a counted layer.
    """
    if ties == "auto":
        return [list(g) for g in (model_ties or [])]
    if ties == "none" or ties is None:
        return []
    if not isinstance(ties, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in ties):
        raise ValueError(f"ties={ties!r} must be 'auto', 'none' or a list of groups of layer names")
    known = set(layers)
    for group in ties:
        unknown = [n for n in group if n not in known]
        if unknown:
            raise ValueError(f"ties group {list(group)} names layers the report does not cover: {unknown} "
                             f"(some covered layers: {', '.join(layers[:5])} ...)")
    return [list(g) for g in ties if len(g) > 1]
