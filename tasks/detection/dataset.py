"""COCO-format detection data: checked loading, the dataset, paired transforms, collate.

Any dataset in COCO's ``instances_*.json`` layout works. Category ids (arbitrary,
often non-contiguous: COCO's run 1..90 with gaps) map to contiguous labels
``1..K`` in sorted id order; label 0 is Faster R-CNN's background. The mapping is
kept on the dataset so the evaluator can map predictions back to category ids.

Annotation problems are reported, never silently trained on:

* unreadable / truncated / structurally wrong json, an image file that is missing,
  or an annotation naming an unknown image or category id -> :class:`COCODatasetError`
  (a ``ValueError``) naming the file;
* a degenerate box (non-positive width or height, non-finite, wrong length) or one
  entirely outside its image -> :class:`COCOAnnotationWarning` naming the image and
  annotation id, then that box is skipped; boxes partly outside are clipped.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

Target = dict[str, Tensor]
MAX_BOX_WARNINGS = 10


class COCODatasetError(ValueError):
    """A COCO dataset cannot be used as given; the message names the offending file."""


class COCOAnnotationWarning(UserWarning):
    """An annotation was skipped (degenerate or outside its image)."""


def load_coco_json(path: str | Path) -> COCO:
    """Parse and structurally check a COCO annotation file into a ``pycocotools`` index.

    Missing ``area`` / ``iscrowd`` fields are filled in (box area, 0) because COCOeval needs them.

    Raises:
        COCODatasetError: the file is missing, not valid json (e.g. truncated), or lacks
            required keys / references unknown image or category ids.
    """
    path = Path(path)
    if not path.is_file():
        raise COCODatasetError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise COCODatasetError(f"COCO annotation file {path} is not valid json (truncated or corrupt?): {e}") from None
    if not isinstance(data, dict):
        raise COCODatasetError(f"COCO annotation file {path}: top level must be an object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise COCODatasetError(f"COCO annotation file {path}: missing or non-list key {key!r}")
    if not data["categories"]:
        raise COCODatasetError(f"COCO annotation file {path} defines no categories")
    _require(path, "images", data["images"], ("id", "file_name", "width", "height"))
    _require(path, "annotations", data["annotations"], ("id", "image_id", "category_id", "bbox"))
    _require(path, "categories", data["categories"], ("id", "name"))
    image_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise COCODatasetError(f"{path}: annotation id {ann['id']} names unknown image id {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise COCODatasetError(
                f"{path}: annotation id {ann['id']} (image id {ann['image_id']}) names unknown category id "
                f"{ann['category_id']}; known: {sorted(cat_ids)}"
            )
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            b = ann["bbox"]
            ann["area"] = float(b[2] * b[3]) if _is_box(b) else 0.0
    data.setdefault("info", {})
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _require(path: Path, key: str, items: list, fields: tuple[str, ...]) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict) or any(f not in item for f in fields):
            raise COCODatasetError(f"COCO annotation file {path}: {key}[{i}] must be an object with keys {fields}")


def _is_box(b: Any) -> bool:
    return isinstance(b, (list, tuple)) and len(b) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b
    )


@dataclass
class _Record:
    image_id: int
    file: Path
    width: int
    height: int
    boxes: np.ndarray  # [N, 4] float32 xyxy, clipped
    labels: np.ndarray  # [N] int64 in 1..K
    iscrowd: np.ndarray  # [N] int64
    area: np.ndarray  # [N] float32


class COCODetection(Dataset):
    """Images and targets of one COCO split, in torchvision's detection format.

    ``dataset[i]`` is ``(image, target)``: ``image`` float ``[3, H, W]`` in 0..1 and
    ``target`` with ``boxes`` ``[N, 4]`` (xyxy, pixels), ``labels`` ``[N]`` (1..K),
    ``image_id`` (the COCO image id), ``area`` and ``iscrowd``. Images without boxes
    give ``boxes`` of shape ``[0, 4]`` (Faster R-CNN trains on them as negatives).

    Args:
        image_dir: folder the json's ``file_name`` entries are relative to.
        annotation_file: COCO ``instances_*.json``.
        transforms: ``(image, target) -> (image, target)`` applied after loading.
        drop_crowd: drop ``iscrowd=1`` boxes (training); evaluation reads crowd
            regions from the json itself.
        drop_empty: drop images left with no boxes.
        check_files: verify every image file exists up front.

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
        check_files: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        if not self.image_dir.is_dir():
            raise COCODatasetError(f"image folder not found: {self.image_dir} (for {self.annotation_file})")
        self.coco = load_coco_json(self.annotation_file)
        self.cat_ids: list[int] = sorted(self.coco.getCatIds())
        self.cat_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {i: c for c, i in self.cat_id_to_label.items()}
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.records = self._build(drop_crowd, drop_empty)
        if check_files:
            missing = [r.file for r in self.records if not r.file.is_file()]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise COCODatasetError(
                    f"image file(s) listed in {self.annotation_file} not found: "
                    f"{', '.join(map(str, missing[:3]))}{more}"
                )

    @property
    def num_categories(self) -> int:
        return len(self.cat_ids)

    def _build(self, drop_crowd: bool, drop_empty: bool) -> list[_Record]:
        records, bad = [], []
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            w, h = float(info["width"]), float(info["height"])
            boxes, labels, crowd, area = [], [], [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if drop_crowd and ann.get("iscrowd", 0):
                    continue
                b = ann["bbox"]
                reason = None
                if not _is_box(b):
                    reason = f"malformed bbox {b!r}"
                elif b[2] <= 0 or b[3] <= 0:
                    reason = f"degenerate bbox {b} (width and height must be > 0)"
                else:
                    x0, y0 = max(b[0], 0.0), max(b[1], 0.0)
                    x1, y1 = min(b[0] + b[2], w), min(b[1] + b[3], h)
                    if x1 <= x0 or y1 <= y0:
                        reason = f"bbox {b} lies outside the {w:g}x{h:g} image"
                if reason:
                    bad.append(f"image id {image_id}, annotation id {ann['id']}: {reason}")
                    continue
                boxes.append([x0, y0, x1, y1])
                labels.append(self.cat_id_to_label[ann["category_id"]])
                crowd.append(int(ann.get("iscrowd", 0)))
                area.append(float(ann["area"]))
            if drop_empty and not boxes:
                continue
            records.append(_Record(
                image_id=image_id, file=self.image_dir / info["file_name"], width=int(w), height=int(h),
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=np.asarray(labels, np.int64),
                iscrowd=np.asarray(crowd, np.int64), area=np.asarray(area, np.float32),
            ))
        for msg in bad[:MAX_BOX_WARNINGS]:
            warnings.warn(f"{self.annotation_file}: skipping {msg}", COCOAnnotationWarning, stacklevel=3)
        if len(bad) > MAX_BOX_WARNINGS:
            warnings.warn(
                f"{self.annotation_file}: skipped {len(bad) - MAX_BOX_WARNINGS} more bad boxes", COCOAnnotationWarning,
                stacklevel=3,
            )
        self.skipped_boxes = len(bad)
        return records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        r = self.records[index]
        try:
            with Image.open(r.file) as im:
                pil = im.convert("RGB")
        except FileNotFoundError:
            raise COCODatasetError(f"image file not found: {r.file} (image id {r.image_id})") from None
        except OSError as e:
            raise COCODatasetError(f"cannot read image file {r.file} (image id {r.image_id}): {e}") from None
        if pil.size != (r.width, r.height):
            raise COCODatasetError(
                f"image file {r.file} is {pil.size[0]}x{pil.size[1]} but {self.annotation_file} says "
                f"{r.width}x{r.height} (image id {r.image_id})"
            )
        image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": torch.from_numpy(r.boxes.copy()),
            "labels": torch.from_numpy(r.labels.copy()),
            "image_id": torch.tensor(r.image_id, dtype=torch.int64),
            "area": torch.from_numpy(r.area.copy()),
            "iscrowd": torch.from_numpy(r.iscrowd.copy()),
        }
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
