"""Datasets over the real on-disk layouts of PASCAL VOC and Cityscapes.

Every file problem is reported with the file's path: a missing image or mask
(``FileNotFoundError``, checked when the dataset is built), a mask whose size
differs from its image, a mask that is not an index PNG, or label values outside
the class range (``ValueError``, checked when the sample is read).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .labels import CITYSCAPES_VALID_IDS, IGNORE_INDEX, cityscapes_lut
from .transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor_image, to_tensor_pair

JointTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
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
        transform: joint transform on the normalised tensors.
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

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and the validated train-id mask (``uint8``/``int`` array) of one sample."""
        image_path, mask_path = self.images[index], self.masks[index]
        image = Image.open(image_path).convert("RGB")
        mask_img = read_index_mask(mask_path)
        if mask_img.size != image.size:
            raise ValueError(
                f"mask {str(mask_path)!r} is {mask_img.size[0]}x{mask_img.size[1]} (WxH) but its image "
                f"{str(image_path)!r} is {image.size[0]}x{image.size[1]}"
            )
        mask = np.asarray(mask_img)
        if self.label_map is not None:
            if self.valid_raw is not None:
                self._check_values(mask, mask_path, lambda v: v in self.valid_raw, "label ids")
            mask = self.label_map[mask.astype(np.int64) & 0xFF]
        else:
            self._check_values(mask, mask_path, lambda v: v < self.num_classes or v == IGNORE_INDEX, "labels")
        return image, mask

    def _check_values(self, mask: np.ndarray, path: Path, ok: Callable[[int], bool], what: str) -> None:
        values = np.unique(mask)
        bad = [int(v) for v in values if not (v >= 0 and ok(int(v)))]
        if bad:
            raise ValueError(
                f"mask {str(path)!r} has {what} {bad} outside the valid range "
                f"(0..{self.num_classes - 1} classes, 255 = ignore)"
            )

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.load(index)
        x, y = to_tensor_pair(image, mask, self.mean, self.std)
        if self.transform is not None:
            x, y = self.transform(x, y)
        return x, y


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
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"list file {str(path)!r} is empty")
    return ids


def voc_dataset(root: str | Path, split: str, *, num_classes: int = 21, mask_dir: str = "SegmentationClass",
                transform: JointTransform | None = None, **kwargs) -> SegmentationFiles:
    """VOC layout: ``JPEGImages/<id>.jpg``, ``<mask_dir>/<id>.png``, ``ImageSets/Segmentation/<split>.txt``."""
    root = Path(root)
    ids = read_id_list(root / "ImageSets" / "Segmentation" / f"{split}.txt")
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
