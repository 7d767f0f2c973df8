"""COCO-format detection data: the dataset, paired transforms, collate.

Any dataset in COCO's ``instances_*.json`` layout works. Category ids (arbitrary,
often non-contiguous: COCO's run 1..90 with gaps) map to contiguous labels
``1..K`` in sorted id order; label 0 is Faster R-CNN's background. With
``category_ids_as_labels=True`` the category id itself is the label (torchvision's
convention for COCO: 91 labels, ids 1..90 with gaps unused). The mapping is kept on the
dataset so the evaluator can map predictions back to category ids.

Annotation problems are reported, never silently trained on (:mod:`.annotations`):
unreadable or inconsistent json -> :class:`COCODatasetError` naming the file; degenerate or
out-of-image boxes -> :class:`COCOAnnotationWarning` naming the image and annotation id,
then skipped. Image files are checked when they are read: a missing or unreadable file,
or one whose size differs from the json's, is a :class:`COCODatasetError` naming it.
Images leave the dataset as ``uint8``; :func:`to_unit_float` (run by ``DetectionModule`` on the
device) scales them to the 0..1 floats torchvision's detectors take.
"""
from __future__ import annotations

import random
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .annotations import COCOAnnotationWarning, COCODatasetError, load_arrays

Target = dict[str, Tensor]

__all__ = ["COCOAnnotationWarning", "COCODatasetError", "COCODetection", "RandomHorizontalFlip", "detection_collate",
           "to_unit_float"]


def to_unit_float(images: Sequence[Tensor]) -> list[Tensor]:
    """``uint8`` images -> float32 in 0..1 (the worker's former ``float() / 255``); float images are kept."""
    return [x if x.is_floating_point() else x.float().div_(255.0) for x in images]


class COCODetection(Dataset):
    """Images and targets of one COCO split, in torchvision's detection format.

    ``dataset[i]`` is ``(image, target)``: ``image`` ``uint8 [3, H, W]`` and ``target`` with
    ``boxes`` ``[N, 4]`` (float32 xyxy, pixels), ``labels`` ``[N]`` (int64), ``image_id``
    (the COCO image id), ``area`` and ``iscrowd``. Images without boxes give ``boxes`` of
    shape ``[0, 4]`` (Faster R-CNN trains on them as negatives).

    Args:
        image_dir: folder the json's ``file_name`` entries are relative to.
        annotation_file: COCO ``instances_*.json`` (or an image-info json with
            ``require_annotations=False``).
        transforms: ``(image, target) -> (image, target)`` applied after loading.
        drop_crowd: drop ``iscrowd=1`` boxes (training); evaluation reads crowd
            regions from the json itself.
        drop_empty: drop images left with no boxes.
        check_files: also verify every image file exists up front (one ``stat`` per image;
            by default a file is checked when it is read).
        category_ids_as_labels: use the category id as the label (see module docstring).
        cache_dir: folder for the parsed annotations (:func:`~.annotations.load_arrays`).
        require_annotations: False accepts files without ``annotations`` (predict-only sets).

    Raises:
        COCODatasetError: see the module docstring.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        *,
        transforms: Callable[[Tensor, Target], tuple[Tensor, Target]] | None = None,
        drop_crowd: bool = True,
        drop_empty: bool = False,
        check_files: bool = False,
        category_ids_as_labels: bool = False,
        cache_dir: str | Path | None = None,
        require_annotations: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        if not self.image_dir.is_dir():
            raise COCODatasetError(f"image folder not found: {self.image_dir} (for {self.annotation_file})")
        a = load_arrays(self.annotation_file, cache_dir=cache_dir, require_annotations=require_annotations)
        self.arrays = a
        self.skipped_boxes = a.skipped
        self.cat_ids: list[int] = a.categories.tolist()
        self.category_ids_as_labels = category_ids_as_labels
        if category_ids_as_labels:
            self.cat_id_to_label = {c: c for c in self.cat_ids}
            self.labels = a.category_ids
        else:
            self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
            self.labels = np.searchsorted(a.categories, a.category_ids).astype(np.int64) + 1
        self.label_to_cat_id: dict[int, int] = {i: c for c, i in self.cat_id_to_label.items()}
        self.class_names: list[str] = a.names.tolist()
        self.keep = a.iscrowd == 0 if drop_crowd else np.ones(len(a.iscrowd), dtype=bool)
        image_of_ann = np.repeat(np.arange(len(a.image_ids)), np.diff(a.offsets))
        kept_per_image = np.bincount(image_of_ann[self.keep], minlength=len(a.image_ids))
        self.rows = np.flatnonzero(kept_per_image > 0) if drop_empty else np.arange(len(a.image_ids))
        if check_files:
            missing = [self._file(r) for r in self.rows if not self._file(r).is_file()]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise COCODatasetError(
                    f"image file(s) listed in {self.annotation_file} not found: "
                    f"{', '.join(map(str, missing[:3]))}{more}"
                )

    @property
    def num_categories(self) -> int:
        return len(self.cat_ids)

    @property
    def num_classes(self) -> int:
        """Labels a detector needs, background included: K + 1, or max id + 1 with ids as labels."""
        return (max(self.cat_ids) if self.category_ids_as_labels else self.num_categories) + 1

    def image_id(self, index: int) -> int:
        return int(self.arrays.image_ids[self.rows[index]])

    def _file(self, row: int) -> Path:
        return self.image_dir / self.arrays.files[row].decode()

    def __len__(self) -> int:
        return len(self.rows)

    def read_image(self, index: int) -> Tensor:
        """``uint8 [3, H, W]`` of image ``index``, checked against the json's size.

        Raises:
            COCODatasetError: the file is missing, unreadable or of another size (named).
        """
        row = int(self.rows[index])
        path, image_id = self._file(row), int(self.arrays.image_ids[row])
        width, height = (int(v) for v in self.arrays.sizes[row])
        try:
            with Image.open(path) as im:
                pil = im.convert("RGB")
        except FileNotFoundError:
            raise COCODatasetError(f"image file not found: {path} (image id {image_id})") from None
        except OSError as e:
            raise COCODatasetError(f"cannot read image file {path} (image id {image_id}): {e}") from None
        if pil.size != (width, height):
            raise COCODatasetError(
                f"image file {path} is {pil.size[0]}x{pil.size[1]} but {self.annotation_file} says "
                f"{width}x{height} (image id {image_id})"
            )
        return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        a, row = self.arrays, int(self.rows[index])
        lo, hi = int(a.offsets[row]), int(a.offsets[row + 1])
        keep = self.keep[lo:hi]
        target = {
            "boxes": torch.from_numpy(a.boxes[lo:hi][keep]),
            "labels": torch.from_numpy(self.labels[lo:hi][keep]),
            "image_id": torch.tensor(int(a.image_ids[row]), dtype=torch.int64),
            "area": torch.from_numpy(a.area[lo:hi][keep]),
            "iscrowd": torch.from_numpy(a.iscrowd[lo:hi][keep].astype(np.int64)),
        }
        image = self.read_image(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class RandomHorizontalFlip:
    """Flip an ``(image, target)`` pair left-right with probability ``p`` (boxes follow)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability p={p} must be in [0, 1]")
        self.p = p

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if random.random() >= self.p:
            return image, target
        width = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        return image.flip(-1), {**target, "boxes": boxes}


def detection_collate(batch: list[tuple[Tensor, Target]]) -> tuple[tuple[Tensor, ...], tuple[Target, ...]]:
    """``[(img, tgt), ...] -> ((img, ...), (tgt, ...))``: images keep their own sizes."""
    images, targets = zip(*batch)
    return tuple(images), tuple(targets)
