"""Datasets over the real on-disk layouts of PASCAL VOC and Cityscapes (found by :mod:`.layout`).

Every file problem is reported with the file's path: a missing image or mask
(``FileNotFoundError``, checked when the dataset is built), a mask whose size
differs from its image, a mask that is not an index PNG, or label values outside
the class range (``ValueError``, checked when the sample is read, with one ``bincount``
per mask; ``scan_labels`` checks a few masks up front). Masks are ``uint8`` throughout.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .labels import CITYSCAPES_VALID_IDS, IGNORE_INDEX, cityscapes_lut
from .transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor_image

# (PIL image, uint8 mask) -> (uint8 [3, h, w], uint8 [h, w]), e.g. transforms.RandomScaleCrop
JointTransform = Callable[[Image.Image, np.ndarray], tuple[Tensor, Tensor]]
_INDEX_MODES = ("P", "L", "I", "I;16")


def read_index_mask(path: Path) -> Image.Image:
    """Open a mask PNG whose pixel values are class indices (palette ``P`` or grayscale ``L``).

    ``np.asarray`` of a palette image gives the indices, not colours, which is how
    VOC's ``SegmentationClass`` PNGs store labels (255 = boundary / ignore).

    Raises:
        ValueError: the file holds colours (RGB/RGBA) instead of indices.
    """
    mask = Image.open(path)
    if mask.mode not in _INDEX_MODES:
        raise ValueError(
            f"mask {str(path)!r} has PIL mode {mask.mode!r}; expected class indices in a palette ('P') "
            "or grayscale ('L') PNG, not colours"
        )
    return mask


def check_exists(paths: Sequence[Path], what: str) -> None:
    """Raise ``FileNotFoundError`` naming the first missing files."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{len(missing)} {what} file(s) missing: {', '.join(missing[:3])}{more}")


class SegmentationFiles(Dataset):
    """``(image, mask)`` pairs from matching file lists.

    Args:
        images: RGB image paths.
        masks: index-PNG mask paths, one per image.
        num_classes: valid train ids are ``0..num_classes-1`` and 255.
        transform: joint transform of training pairs (``uint8`` out); without one, the image
            is normalised float and the mask ``uint8``.
        label_map: optional ``uint8 [256]`` lookup from raw mask values to train ids
            (Cityscapes); ``valid_raw`` then lists the allowed raw values.
    """

    def __init__(self, images: Sequence[Path], masks: Sequence[Path], *, num_classes: int,
                 transform: JointTransform | None = None, label_map: np.ndarray | None = None,
                 valid_raw: frozenset[int] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        check_exists(images, "image")
        check_exists(masks, "mask")
        self.images, self.masks = list(images), list(masks)
        self.num_classes = num_classes
        self.transform = transform
        self.label_map = label_map
        self.valid_raw = valid_raw
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.images)

    def read_mask(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The checked train-id mask (``uint8 [H, W]``) of one sample and its ``(width, height)``.

        Raises:
            ValueError: colours instead of indices, or values outside the class range (names the file).
        """
        path = self.masks[index]
        mask_img = read_index_mask(path)
        mask = np.asarray(mask_img)
        if self.label_map is not None:
            if self.valid_raw is not None:
                self._check_values(mask, path, lambda v: v in self.valid_raw, "label ids")
            mask = self.label_map[mask & 0xFF]
        else:
            self._check_values(mask, path, lambda v: v < self.num_classes or v == IGNORE_INDEX, "labels")
        return mask.astype(np.uint8, copy=False), mask_img.size

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and the validated train-id mask (``uint8``) of one sample."""
        image_path = self.images[index]
        image = Image.open(image_path)
        mask, size = self.read_mask(index)
        if size != image.size:
            raise ValueError(
                f"mask {str(self.masks[index])!r} is {size[0]}x{size[1]} (WxH) but its image "
                f"{str(image_path)!r} is {image.size[0]}x{image.size[1]}"
            )
        return image.convert("RGB"), mask

    def scan_labels(self, count: int) -> None:
        """Check up to ``count`` masks spread over the set (before training, not one epoch in).

        Raises:
            ValueError: a mask with values outside the class range (names the file and ``num_classes``).
        """
        for index in np.unique(np.linspace(0, len(self) - 1, num=min(count, len(self))).round().astype(int)):
            self.read_mask(int(index))

    def _check_values(self, mask: np.ndarray, path: Path, ok: Callable[[int], bool], what: str) -> None:
        if mask.size and int(mask.min()) < 0:
            bad = sorted({int(v) for v in mask.ravel() if v < 0})
        else:
            bad = [int(v) for v in np.flatnonzero(np.bincount(mask.ravel())) if not ok(int(v))]
        if bad:
            raise ValueError(
                f"mask {str(path)!r} has {what} {bad} outside the valid range "
                f"(num_classes={self.num_classes}: 0..{self.num_classes - 1}, 255 = ignore)"
            )

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.load(index)
        if self.transform is not None:
            return self.transform(image, mask)
        return to_tensor_image(image, self.mean, self.std), torch.from_numpy(np.array(mask, dtype=np.uint8))


class SegmentationImages(Dataset):
    """Images alone, for ``predict``: ``(image, id, (height, width))`` (the split needs no masks).

    Args:
        images: RGB image paths.
        ids: one name per image; the predicted mask is written as ``<id>.png``.
    """

    def __init__(self, images: Sequence[Path], ids: Sequence[str], *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        if len(images) != len(ids):
            raise ValueError(f"{len(images)} images but {len(ids)} ids")
        check_exists(images, "image")
        self.images, self.ids = list(images), list(ids)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, str, tuple[int, int]]:
        image = Image.open(self.images[index]).convert("RGB")
        return to_tensor_image(image, self.mean, self.std), self.ids[index], (image.height, image.width)


def read_id_list(path: Path) -> list[str]:
    """Sample ids, one per line, from a VOC ``ImageSets`` list file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"list file {str(path)!r} not found; expected the VOC layout "
            "<root>/ImageSets/Segmentation/<split>.txt, <root>/JPEGImages, <root>/SegmentationClass"
        )
    # plain ids, or SBD/DeepLab "train_aug" lines: "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
    ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"list file {str(path)!r} is empty")
    return ids


def voc_dataset(root: str | Path, split: str, *, num_classes: int = 21, mask_dir: str | Path = "SegmentationClass",
                transform: JointTransform | None = None, list_file: Path | None = None, **kwargs) -> SegmentationFiles:
    """VOC layout: ``JPEGImages/<id>.jpg``, ``<mask_dir>/<id>.png`` (relative to ``root`` or absolute),
    ids from ``ImageSets/Segmentation/<split>.txt`` (or ``list_file``)."""
    root = Path(root)
    ids = read_id_list(list_file or root / "ImageSets" / "Segmentation" / f"{split}.txt")
    images = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    masks = [root / mask_dir / f"{i}.png" for i in ids]
    return SegmentationFiles(images, masks, num_classes=num_classes, transform=transform, **kwargs)


def voc_images(root: str | Path, split: str, **kwargs) -> SegmentationImages:
    """The images of a VOC split list (``JPEGImages/<id>.jpg``), ids as listed."""
    root = Path(root)
    ids = read_id_list(root / "ImageSets" / "Segmentation" / f"{split}.txt")
    return SegmentationImages([root / "JPEGImages" / f"{i}.jpg" for i in ids], ids, **kwargs)


def _cityscapes_images(root: Path, split: str) -> list[Path]:
    image_dir = root / "leftImg8bit" / split
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(
            f"no images matching {str(image_dir / '<city>' / '*_leftImg8bit.png')!r}; expected the Cityscapes "
            "layout <root>/leftImg8bit/<split>/<city>/ and <root>/gtFine/<split>/<city>/"
        )
    return images


def cityscapes_images(root: str | Path, split: str, **kwargs) -> SegmentationImages:
    """The images of a Cityscapes split, ids ``<city>_<seq>_<frame>`` (the name without ``_leftImg8bit``)."""
    images = _cityscapes_images(Path(root), split)
    return SegmentationImages(images, [p.name.removesuffix("_leftImg8bit.png") for p in images], **kwargs)


def cityscapes_dataset(root: str | Path, split: str, *, transform: JointTransform | None = None,
                       **kwargs) -> SegmentationFiles:
    """Cityscapes layout: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png``, mapped to the 19 train ids."""
    root = Path(root)
    images = _cityscapes_images(root, split)
    masks = [
        root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        for p in images
    ]
    return SegmentationFiles(images, masks, num_classes=19, transform=transform, label_map=cityscapes_lut(),
                             valid_raw=CITYSCAPES_VALID_IDS, **kwargs)
