"""Training / evaluation transforms of the file-based classification DataModules.

A preset picks the recipe, explicit options override single parts of it:

* ``small`` (CIFAR-style, the default for ``image_size <= 64``): resize the short side to
  ``image_size``, then a random crop of ``image_size`` from the image padded by
  ``pad = image_size // 8`` black pixels (random shifts); evaluation: resize + centre crop.
  No flips by default: on small images (digits, glyphs, signs, icons) mirroring often
  changes the class. CIFAR-10 turns them on.
* ``imagenet`` (the default above 64 px): ``RandomResizedCrop(image_size, scale=(0.08, 1))``
  and horizontal flips; evaluation: resize to ``resize_ratio * image_size`` (1.143, i.e.
  256 for 224) + centre crop.
* ``none``: the evaluation transform for training too.
* ``timm_transform``: keyword arguments of ``timm.data.create_transform`` (e.g.
  ``{"auto_augment": "rand-m9-mstd0.5", "scale": [0.35, 1]}``) replace the preset.

Training transforms end in a ``uint8`` tensor (normalised on the device, see
:mod:`tasks.loaders`); evaluation transforms end normalised in float, ready for the model.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torchvision.transforms import v2 as T

Preset = Literal["auto", "small", "imagenet", "none"]
SMALL_MAX_SIZE = 64
_TIMM_FIXED = ("input_size", "is_training", "use_prefetcher", "mean", "std", "separate", "normalize")


@dataclass(frozen=True)
class Augmentation:
    """A resolved recipe (what the preset and the options amount to).

    Attributes:
        crop: ``pad`` (pad + random crop), ``resized`` (RandomResizedCrop) or ``none``.
        crop_scale: area range of ``resized`` crops.
        pad: pixels of padding for ``pad`` crops.
        hflip: random horizontal flips in training.
        resize_ratio: evaluation resizes the short side to ``resize_ratio * image_size``,
            then crops the centre ``image_size``.
    """

    crop: Literal["pad", "resized", "none"]
    crop_scale: tuple[float, float]
    pad: int
    hflip: bool
    resize_ratio: float


def resolve(image_size: int, preset: Preset = "auto", *, crop_scale: Sequence[float] | None = None,
            pad: int | None = None, hflip: bool | None = None, resize_ratio: float | None = None) -> Augmentation:
    """The recipe for ``image_size``: the preset's values, with every given option replacing its part.

    ``crop_scale`` switches the crop to ``resized`` and ``pad`` to ``pad``.

    Raises:
        ValueError: unknown preset, or option values out of range (named).
    """
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be >= 1")
    if preset == "auto":
        preset = "small" if image_size <= SMALL_MAX_SIZE else "imagenet"
    presets = {
        "small": Augmentation("pad", (0.08, 1.0), max(image_size // 8, 1), False, 1.0),
        "imagenet": Augmentation("resized", (0.08, 1.0), max(image_size // 8, 1), True, 1.143),
        "none": Augmentation("none", (0.08, 1.0), 0, False, 1.0),
    }
    if preset not in presets:
        raise ValueError(f"augment={preset!r} is not one of: auto, {', '.join(presets)}")
    aug = presets[preset]
    if crop_scale is not None:
        lo, hi = (float(v) for v in crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale={list(crop_scale)} must satisfy 0 < min <= max <= 1")
        aug = replace(aug, crop="resized", crop_scale=(lo, hi))
    if pad is not None:
        if pad < 0:
            raise ValueError(f"pad={pad} must be >= 0")
        aug = replace(aug, crop="pad", pad=pad)
    if hflip is not None:
        aug = replace(aug, hflip=bool(hflip))
    if resize_ratio is not None:
        if resize_ratio < 1:
            raise ValueError(f"resize_ratio={resize_ratio} must be >= 1 (the centre crop is image_size)")
        aug = replace(aug, resize_ratio=float(resize_ratio))
    return aug


def _to_float(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


def eval_transform(image_size: int, aug: Augmentation, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the short side to ``resize_ratio * image_size``, centre crop (on the PIL image), normalised float."""
    resize = int(round(image_size * aug.resize_ratio))
    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(image_size), T.PILToTensor(),
                      *_to_float(mean, std)])


def train_transform(image_size: int, aug: Augmentation) -> T.Compose:
    """The training recipe on the PIL image (PIL's resampling, as torchvision's references), ``uint8`` out."""
    if aug.crop == "resized":
        steps: list = [T.RandomResizedCrop(image_size, scale=aug.crop_scale, antialias=True)]
    else:
        resize = image_size if aug.crop == "pad" else int(round(image_size * aug.resize_ratio))
        steps = [T.Resize(resize, antialias=True), T.CenterCrop(image_size)]
        if aug.crop == "pad" and aug.pad > 0:
            steps.append(T.RandomCrop(image_size, padding=aug.pad, fill=0))
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.PILToTensor()])


def timm_transforms(image_size: int, options: dict[str, Any], mean: Sequence[float],
                    std: Sequence[float]) -> tuple[Any, Any]:
    """``timm.data.create_transform`` for training (``uint8`` out) and evaluation (normalised float out).

    Raises:
        ValueError: an option this module sets itself, or random erasing (it runs on normalised
            tensors, after the device-side normalisation here).
    """
    from timm.data import create_transform

    fixed = sorted(set(options) & set(_TIMM_FIXED))
    if fixed:
        raise ValueError(f"timm_transform sets {fixed}; those come from image_size / mean / std here")
    if options.get("re_prob", 0):
        raise ValueError("timm_transform: re_prob (random erasing) is not supported: it works on normalised tensors")
    common = {"input_size": image_size, "use_prefetcher": True, "mean": tuple(mean), "std": tuple(std)}
    try:
        train = create_transform(is_training=True, **common, **options)
        evaluation = create_transform(is_training=False, **common, **options)
    except TypeError as e:
        raise ValueError(f"timm_transform: {e}") from None
    return train, T.Compose([evaluation, *_to_float(mean, std)])
