"""``COCODataModule``: any COCO-format dataset (image folders + ``instances_*.json``).

``root`` alone is enough for the COCO 2017 and 2014 releases and the plain layout that
:func:`make_digits_coco` writes (:mod:`.layout`); explicit paths override it. With
``make_digits_if_missing=True`` and nothing at ``root`` yet, ``prepare_data`` writes the
embedded digits-COCO set there, so the quickstart needs no download.

Loading for scale: annotations are parsed once per node into compact arrays and cached
(``annotation_cache``); workers return ``uint8`` images, which ``DetectionModule`` scales to
0..1 on the device; memory is pinned on CUDA; the evaluation ground truth
(a ``pycocotools`` index) is built on rank 0 only, when it first scores.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from tasks.loaders import make_loader

from .annotations import COCODatasetError, load_arrays, load_coco_json
from .dataset import COCODetection, RandomHorizontalFlip, detection_collate, to_unit_float
from .digits_coco import make_digits_coco
from .layout import find_split


def default_cache_dir() -> Path:
    """``$GDRQ_CACHE/coco``, else ``~/.cache/gdrq/coco`` (as torch hub and timm keep theirs)."""
    base = os.environ.get("GDRQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gdrq")
    return Path(base) / "coco"


class COCODataModule(pl.LightningDataModule):
    """Train/val/predict loaders over COCO-format data, with the category id <-> label mapping.

    Args:
        root: dataset folder (COCO 2017 / 2014 release or the plain layout, see :mod:`.layout`).
        train_images / train_annotations: training image folder / json (default: found under ``root``).
        val_images / val_annotations: validation image folder / json (default: found under ``root``).
        predict_split: ``val`` (default) or ``test`` (``test2017/`` with its image-info json: no
            boxes needed) for ``predict``.
        predict_images / predict_annotations: explicit folder / json for ``predict``
            (the json may be an image-info file without annotations).
        category_ids_as_labels: the category id is the label (torchvision's COCO convention,
            ``num_classes`` = largest id + 1 = 91 for COCO); default: contiguous ``1..K``.
        annotation_cache: folder for parsed annotations (``auto``: :func:`default_cache_dir`;
            null: parse the json in every process).
        make_digits_if_missing: write the embedded digits-COCO set to ``root`` if no layout is found.
        batch_size: training images per device and step.
        val_batch_size: validation images per device and step (default ``batch_size``).
        num_workers: DataLoader worker processes.
        hflip_prob: probability of a horizontal flip of each training pair.
        drop_empty_train: drop training images with no (valid, non-crowd) boxes;
            by default they are kept as pure negatives.
        draw_predictions: ``predict`` also writes one PNG per image with the detections drawn
            (a data option, so ``gdrq predict --ckpt_path`` can turn it on: the model's options
            come from the checkpoint).

    After ``setup``: ``cat_id_to_label``, ``label_to_cat_id``, ``class_names``,
    ``num_classes`` (labels incl. background, what the detector needs) and ``val_coco``
    (the ground truth ``COCO`` index, built on first use).
    """

    def __init__(
        self,
        *,
        root: str | None = None,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        predict_split: Literal["val", "test"] = "val",
        predict_images: str | None = None,
        predict_annotations: str | None = None,
        category_ids_as_labels: bool = False,
        annotation_cache: str | None = "auto",
        make_digits_if_missing: bool = False,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        hflip_prob: float = 0.5,
        drop_empty_train: bool = False,
        draw_predictions: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, val_batch_size={val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if predict_split not in ("val", "test"):
            raise ValueError(f"predict_split={predict_split!r} is not one of: val, test")
        if make_digits_if_missing and root is None:
            raise ValueError("make_digits_if_missing=True needs root= (the folder to write the digits-COCO set to)")
        self.root = Path(root) if root is not None else None
        self.given = {
            "train": (train_images, train_annotations), "val": (val_images, val_annotations),
            "predict": (predict_images, predict_annotations),
        }
        self.cache_dir = default_cache_dir() if annotation_cache == "auto" else annotation_cache
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.flip = RandomHorizontalFlip(hflip_prob)
        self.draw_predictions = draw_predictions
        self.train_set: COCODetection | None = None
        self.val_set: COCODetection | None = None
        self.predict_set: COCODetection | None = None
        self._val_coco: COCO | None = None

    def paths(self, split: str) -> tuple[Path, Path]:
        """Image folder and annotation file of ``train``, ``val`` or ``predict``.

        Raises:
            ValueError: neither explicit paths nor ``root`` given.
            COCODatasetError: ``root`` holds no such split (the message lists what was looked for).
        """
        images, annotations = self.given[split]
        if images is not None and annotations is not None:
            return Path(images), Path(annotations)
        if split == "predict" and self.hparams.predict_split == "val":
            found = self.paths("val")
        elif self.root is None:
            raise ValueError(f"COCODataModule: set {split}_images= and {split}_annotations=, or root=")
        else:
            found = find_split(self.root, self.hparams.predict_split if split == "predict" else split)
        return Path(images) if images else found[0], Path(annotations) if annotations else found[1]

    @property
    def train_annotations(self) -> Path:
        return self.paths("train")[1]

    @property
    def val_annotations(self) -> Path:
        return self.paths("val")[1]

    def prepare_data(self) -> None:
        """Write digits-COCO if asked and absent; parse the annotations into the cache (once per node)."""
        if self.hparams.make_digits_if_missing:
            try:
                self.paths("train"), self.paths("val")
            except COCODatasetError:
                make_digits_coco(self.root)
        if self.cache_dir is not None:
            for split in ("train", "val"):
                try:
                    load_arrays(self.paths(split)[1], cache_dir=self.cache_dir, warn=False)
                except (COCODatasetError, ValueError):
                    pass  # reported by setup, on every rank, with the stage that needs the split

    def _dataset(self, split: str, **kwargs: Any) -> COCODetection:
        images, annotations = self.paths(split)
        return COCODetection(images, annotations, category_ids_as_labels=self.hparams.category_ids_as_labels,
                             cache_dir=self.cache_dir, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset("train", transforms=self.flip, drop_crowd=True,
                                           drop_empty=self.hparams.drop_empty_train)
        if stage != "predict" and self.val_set is None:
            self.val_set = self._dataset("val", drop_crowd=False)
        if stage == "predict" and self.predict_set is None:
            self.predict_set = self._dataset("predict", drop_crowd=False, require_annotations=False)
        ref = self._reference()
        for other in (self.train_set, self.val_set):
            if other is not None and other.cat_ids != ref.cat_ids:
                raise COCODatasetError(
                    f"category ids differ between {ref.annotation_file} ({ref.cat_ids}) and "
                    f"{other.annotation_file} ({other.cat_ids}); both splits need the same categories"
                )

    def _reference(self) -> COCODetection:
        ref = self.train_set or self.val_set or self.predict_set
        if ref is None:
            raise RuntimeError("COCODataModule.setup() has not run yet")
        return ref

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return self._reference().cat_id_to_label

    @property
    def label_to_cat_id(self) -> dict[int, int]:
        return self._reference().label_to_cat_id

    @property
    def class_names(self) -> list[str]:
        return self._reference().class_names

    @property
    def num_classes(self) -> int:
        """Labels the detector needs, background included (Faster R-CNN's ``num_classes``)."""
        return self._reference().num_classes

    def load_val_coco(self) -> COCO:
        """The validation ground truth as a ``pycocotools`` index, built once on first call."""
        if self._val_coco is None:
            if self.val_set is None:
                raise RuntimeError("COCODataModule.setup() has not run yet")
            self._val_coco = load_coco_json(self.val_set.annotation_file)
        return self._val_coco

    val_coco = property(load_val_coco)

    def _loader(self, dataset: COCODetection | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("COCODataModule.setup() has not run yet")
        return make_loader(self, dataset, batch_size=batch_size, num_workers=self.num_workers, shuffle=shuffle,
                           collate_fn=detection_collate)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``uint8`` images -> float in 0..1 on the device (what torchvision's detectors take);
        the same for every consumer that prepares batches the Lightning way (``gdrq export``)."""
        if not (isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (tuple, list))):
            return batch
        return (tuple(to_unit_float(batch[0])), *batch[1:])

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """COCO's test splits have no public ground truth: ``test`` scores the val split."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            self.setup("predict")
        return self._loader(self.predict_set, self.val_batch_size, shuffle=False)
