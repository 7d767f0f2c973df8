"""``COCODataModule``: any COCO-format dataset (train/val image folders + json files).

``root`` fills in the standard layout (``train/``, ``val/``,
``annotations/instances_{train,val}.json``, what :func:`make_digits_coco`
writes); explicit paths override it (e.g. COCO 2017's ``train2017/``). With
``make_digits_if_missing=True`` and nothing at ``root`` yet, ``prepare_data`` writes the
embedded digits-COCO set there, so the quickstart needs no download.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from .dataset import COCODatasetError, COCODetection, RandomHorizontalFlip, detection_collate
from .digits_coco import make_digits_coco


class COCODataModule(pl.LightningDataModule):
    """Train/val loaders over COCO-format data, with the category id <-> label mapping.

    Args:
        root: dataset folder with ``train/``, ``val/`` and ``annotations/`` (optional
            when all four paths below are given).
        train_images: folder of training images (default ``root/train``).
        train_annotations: training json (default ``root/annotations/instances_train.json``).
        val_images: folder of validation images (default ``root/val``).
        val_annotations: validation json (default ``root/annotations/instances_val.json``).
        make_digits_if_missing: write the embedded digits-COCO set to ``root`` if its
            annotation files are missing.
        batch_size: training images per device and step.
        val_batch_size: validation images per device and step (default ``batch_size``).
        num_workers: DataLoader worker processes.
        hflip_prob: probability of a horizontal flip of each training pair.
        drop_empty_train: drop training images with no (valid, non-crowd) boxes;
            by default they are kept as pure negatives.

    After ``setup``: ``cat_id_to_label`` (COCO category id -> 1..K),
    ``label_to_cat_id``, ``class_names``, ``num_classes`` (K + background) and
    ``val_coco`` (the ground truth ``COCO`` index the evaluator scores against).
    """

    def __init__(
        self,
        *,
        root: str | None = None,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        make_digits_if_missing: bool = False,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        hflip_prob: float = 0.5,
        drop_empty_train: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, val_batch_size={val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.root = Path(root) if root is not None else None
        self.train_images = self._path(train_images, "train")
        self.train_annotations = self._path(train_annotations, "annotations/instances_train.json")
        self.val_images = self._path(val_images, "val")
        self.val_annotations = self._path(val_annotations, "annotations/instances_val.json")
        if make_digits_if_missing and self.root is None:
            raise ValueError("make_digits_if_missing=True needs root= (the folder to write the digits-COCO set to)")
        self.make_digits_if_missing = make_digits_if_missing
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.flip = RandomHorizontalFlip(hflip_prob)
        self.drop_empty_train = drop_empty_train
        self.train_set: COCODetection | None = None
        self.val_set: COCODetection | None = None

    def _path(self, given: str | None, default: str) -> Path | None:
        if given is not None:
            return Path(given)
        return self.root / default if self.root is not None else None

    def prepare_data(self) -> None:
        """Generate digits-COCO under ``root`` when asked and absent (local rank 0 only)."""
        if self.make_digits_if_missing and not (self.train_annotations.is_file() and self.val_annotations.is_file()):
            make_digits_coco(self.root)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = COCODetection(
                self._need(self.train_images, "train_images"), self._need(self.train_annotations, "train_annotations"),
                transforms=self.flip, drop_crowd=True, drop_empty=self.drop_empty_train,
            )
        if self.val_set is None:
            self.val_set = COCODetection(
                self._need(self.val_images, "val_images"), self._need(self.val_annotations, "val_annotations"),
                drop_crowd=False,
            )
        if self.train_set is not None and self.train_set.cat_ids != self.val_set.cat_ids:
            raise COCODatasetError(
                f"category ids differ between {self.train_annotations} ({self.train_set.cat_ids}) and "
                f"{self.val_annotations} ({self.val_set.cat_ids}); both splits need the same categories"
            )

    @staticmethod
    def _need(path: Path | None, name: str) -> Path:
        if path is None:
            raise ValueError(f"COCODataModule: set {name}= or root=")
        return path

    def _reference(self) -> COCODetection:
        ref = self.train_set or self.val_set
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
        """Categories plus background: Faster R-CNN's ``num_classes``."""
        return self._reference().num_categories + 1

    @property
    def val_coco(self) -> COCO:
        if self.val_set is None:
            raise RuntimeError("COCODataModule.setup() has not run yet")
        return self.val_set.coco

    def _loader(self, dataset: COCODetection, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=detection_collate, persistent_workers=self.num_workers > 0,
        )

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
        return self.val_dataloader()
