"""Joint transforms on ``(image, mask)`` pairs (torchvision ``references/segmentation`` style).

Images are float tensors ``[3, H, W]`` (normalised first, so zero padding is the mean
colour), masks ``int64 [H, W]`` with 255 = ignore. Geometric transforms resize the
image bilinearly and the mask with nearest neighbour, and pad masks with 255 so
padded pixels never count in the loss or the metrics.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms.functional import pil_to_tensor

from .labels import IGNORE_INDEX

Pair = tuple[Tensor, Tensor]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Tensor, Tensor], Pair]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, mask: Tensor) -> Pair:
        for t in self.transforms:
            image, mask = t(image, mask)
        return image, mask


def to_tensor_image(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """PIL RGB image -> normalised ``float [3,H,W]``."""
    x = pil_to_tensor(image).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def to_tensor_pair(image: Image.Image, mask: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Pair:
    """PIL RGB image + integer mask array -> normalised ``float [3,H,W]`` and ``int64 [H,W]``."""
    return to_tensor_image(image, mean, std), torch.from_numpy(np.array(mask, dtype=np.int64))


class RandomScale:
    """Resize both by one factor drawn uniformly from ``[min_scale, max_scale]``."""

    def __init__(self, min_scale: float, max_scale: float) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"scale range must satisfy 0 < min <= max, got ({min_scale}, {max_scale})")
        self.min_scale, self.max_scale = min_scale, max_scale

    def __call__(self, image: Tensor, mask: Tensor) -> Pair:
        s = random.uniform(self.min_scale, self.max_scale)
        h, w = mask.shape
        size = (max(1, round(h * s)), max(1, round(w * s)))
        if size == (h, w):
            return image, mask
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return image, mask


def pad_to(image: Tensor, mask: Tensor, height: int, width: int) -> Pair:
    """Pad bottom/right to at least ``height x width``: image with 0, mask with 255."""
    ph, pw = max(height - mask.shape[0], 0), max(width - mask.shape[1], 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
    return image, mask


class RandomCrop:
    """Pad (mask with 255) where smaller than ``size``, then crop ``size`` at a random place."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, image: Tensor, mask: Tensor) -> Pair:
        ch, cw = self.size
        image, mask = pad_to(image, mask, ch, cw)
        h, w = mask.shape
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        return image[:, top:top + ch, left:left + cw], mask[top:top + ch, left:left + cw]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Tensor, mask: Tensor) -> Pair:
        if random.random() < self.p:
            return image.flip(-1), mask.flip(-1)
        return image, mask


def train_transforms(crop_size: int | Sequence[int], scale_range: Sequence[float], hflip: bool) -> Compose:
    """Random scale -> random crop with padding -> horizontal flip."""
    steps: list = [RandomScale(*scale_range), RandomCrop(crop_size)]
    if hflip:
        steps.append(RandomHorizontalFlip())
    return Compose(steps)


def pad_collate(batch: list[Pair]) -> Pair:
    """Stack pairs of different sizes by padding to the largest (image 0, mask 255)."""
    height = max(m.shape[0] for _, m in batch)
    width = max(m.shape[1] for _, m in batch)
    padded = [pad_to(x, m, height, width) for x, m in batch]
    return torch.stack([x for x, _ in padded]), torch.stack([m for _, m in padded])


def pad_images_collate(batch: list[tuple[Tensor, str, tuple[int, int]]]) -> tuple[Tensor, list[str], list[tuple[int, int]]]:
    """``predict`` batches: images padded to the largest (with 0), their ids and original sizes."""
    height = max(x.shape[1] for x, _, _ in batch)
    width = max(x.shape[2] for x, _, _ in batch)
    images = torch.stack([F.pad(x, (0, width - x.shape[2], 0, height - x.shape[1])) for x, _, _ in batch])
    return images, [i for _, i, _ in batch], [size for _, _, size in batch]
