"""Training crops and batch collation for ``(image, mask)`` pairs.

Training (:class:`RandomScaleCrop`): a random scale, a random crop, a random flip, in that
order of effect but done crop-first on the decoded ``uint8`` image: the crop window is
chosen in source pixels (``crop_size / scale``) and only that window is resized (PIL,
bilinear for the image, nearest for the mask), so a 2048x1024 Cityscapes frame is never
resized or converted to float as a whole. Where the scaled image is smaller than the crop,
the image is padded with the mean colour (normalises to about 0) and the mask with 255
(ignored by loss and metrics). Images and masks leave the worker as ``uint8``; the
DataModule normalises images on the device (:mod:`tasks.loaders`).

Evaluation images are whole and normalised in the worker (float, what ``gdrq export
--data-config`` reads); masks stay ``uint8`` (255 = ignore).
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms.functional import pil_to_tensor

from tasks.loaders import IMAGENET_MEAN, IMAGENET_STD, mean_color

from .labels import IGNORE_INDEX

Pair = tuple[Tensor, Tensor]
__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RandomScaleCrop", "pad_collate", "pad_images_collate", "pad_to",
           "to_tensor_image"]


def to_tensor_image(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """PIL RGB image -> normalised ``float [3,H,W]``."""
    x = pil_to_tensor(image).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class RandomScaleCrop:
    """Scale by ``U(min_scale, max_scale)``, crop ``crop_size`` at a random place, flip; ``uint8`` out.

    Args:
        crop_size: ``size`` or ``(height, width)`` of the output.
        scale_range: ``(min_scale, max_scale)``.
        hflip: flip the pair left-right with probability 0.5.
        mean: the normalisation mean; the image padding is its ``uint8`` colour.
    """

    def __init__(self, crop_size: int | Sequence[int], scale_range: Sequence[float], hflip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN) -> None:
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale range must satisfy 0 < min <= max, got ({lo}, {hi})")
        self.size = (crop_size, crop_size) if isinstance(crop_size, int) else (int(crop_size[0]), int(crop_size[1]))
        self.scale_range, self.hflip, self.fill = (lo, hi), hflip, mean_color(mean)

    @staticmethod
    def _window(length: int, crop: int, scale: float) -> tuple[int, int, int]:
        """Source start and length of the crop along one axis, and its length after scaling."""
        want = max(1, round(crop / scale))
        if want < length:
            return random.randint(0, length - want), want, crop
        return 0, length, min(crop, max(1, round(length * scale)))

    def __call__(self, image: Image.Image, mask: np.ndarray) -> Pair:
        scale = random.uniform(*self.scale_range)
        ch, cw = self.size
        top, h, out_h = self._window(image.height, ch, scale)
        left, w, out_w = self._window(image.width, cw, scale)
        box = (left, top, left + w, top + h)
        x = image.resize((out_w, out_h), Image.BILINEAR, box=box)
        y = Image.fromarray(mask).resize((out_w, out_h), Image.NEAREST, box=box)
        if (out_h, out_w) != (ch, cw):  # the scaled image is smaller than the crop: pad bottom / right
            x, y = _pasted(x, Image.new("RGB", (cw, ch), self.fill)), _pasted(y, Image.new("L", (cw, ch), IGNORE_INDEX))
        if self.hflip and random.random() < 0.5:
            x, y = x.transpose(Image.Transpose.FLIP_LEFT_RIGHT), y.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(x).contiguous(), pil_to_tensor(y)[0]


def _pasted(image: Image.Image, canvas: Image.Image) -> Image.Image:
    canvas.paste(image, (0, 0))
    return canvas


def pad_to(image: Tensor, mask: Tensor, height: int, width: int) -> Pair:
    """Pad bottom/right to at least ``height x width``: image with 0, mask with 255."""
    ph, pw = max(height - mask.shape[0], 0), max(width - mask.shape[1], 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0)
        mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
    return image, mask


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
