"""LightningDataModules for PASCAL VOC (optionally SBD-augmented) and Cityscapes.

``root`` alone finds the data (:mod:`.layout`: VOC2012, VOCdevkit or its parent; Cityscapes as
its archives unpack). Training batches are random-scaled, padded and cropped to ``crop_size``
and flipped, crop first, as ``uint8`` images and masks (:mod:`.transforms`), normalised on the
device; validation and test run on whole images, batched by padding to the largest image in the
batch (image 0 = mean colour after normalisation, mask 255 = ignored), so padding
never touches the metrics. ``test`` scores ``test_split`` (default: the validation
split); ``predict`` reads the images of ``predict_split`` (default: the validation
split; no masks needed) and yields ``(images, ids, sizes)`` so masks can be cropped back. The training loader drops its last incomplete batch
(PSPNet's BN layers need more than one value per channel). Under DDP the evaluation
loaders split the images without repeats: Lightning's ``DistributedSampler`` would pad the
ranks even with duplicates, which the confusion matrix would count twice. ``setup`` reads a
few training masks (:data:`LABEL_SCAN`) so labels beyond ``num_classes`` stop the run before
its first step.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from tasks.loaders import NormalizeOnDevice, make_loader

from .datasets import (
    SegmentationFiles, SegmentationImages, cityscapes_dataset, cityscapes_images, voc_dataset, voc_images,
)
from .labels import CITYSCAPES_CLASSES, default_class_names
from .layout import cityscapes_root, voc_augmented, voc_root
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RandomScaleCrop, pad_collate, pad_images_collate

LABEL_SCAN = 32  # training masks read in setup to check the labels against num_classes


class _SegmentationDataModule(NormalizeOnDevice, pl.LightningDataModule):
    """Shared loaders and transforms; subclasses build the split datasets in ``setup``."""

    num_classes: int
    class_names: list[str]

    def __init__(self, *, root: str, batch_size: int, val_batch_size: int | None, num_workers: int,
                 crop_size: int | tuple[int, int], scale_range: tuple[float, float], hflip: bool,
                 mean: Sequence[float], std: Sequence[float], train_split: str, val_split: str,
                 test_split: str | None, predict_split: str | None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if len(scale_range) != 2:
            raise ValueError(f"scale_range={scale_range!r} must be (min, max)")
        self.root = Path(root)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.hflip = hflip
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_split, self.val_split = train_split, val_split
        self.test_split = test_split or val_split
        self.predict_split = predict_split or val_split
        self.train_set: SegmentationFiles | None = None
        self.val_set: SegmentationFiles | None = None
        self.test_set: SegmentationFiles | None = None
        self.predict_set: SegmentationImages | None = None

    def _train_transform(self) -> RandomScaleCrop:
        return RandomScaleCrop(self.crop_size, self.scale_range, self.hflip, self.mean)

    def _loader(self, dataset: Dataset | None, *, train: bool, collate=pad_collate) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        sampler = None
        if not train and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)  # Lightning keeps a DistributedSampler
        return make_loader(
            self, dataset, batch_size=self.batch_size if train else self.val_batch_size, shuffle=train,
            sampler=sampler, drop_last=train and len(dataset) > self.batch_size, num_workers=self.num_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, train=False, collate=pad_images_collate)


class VOCSegmentationDataModule(_SegmentationDataModule):
    """PASCAL VOC segmentation: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs of
    class indices, 255 = boundary/ignore), ``ImageSets/Segmentation/{train,val}.txt``.

    Args:
        root: the ``VOC2012`` folder, the ``VOCdevkit`` holding it, or the folder holding
            ``VOCdevkit`` (or a generated digits-VOC folder).
        num_classes: 21 for VOC, 11 for digits-VOC; mask values must be below it or 255.
        train_split / val_split: list files under ``ImageSets/Segmentation``.
        test_split: list file scored by ``test`` (default: ``val_split``).
        predict_split: list file whose images ``predict`` segments (default: ``val_split``).
        augmented: train on the SBD-augmented set: ``train_aug.txt`` with masks from
            ``SegmentationClassAug/`` (see :mod:`.layout`; validation stays on VOC's own masks).
        class_names: names for per-class metrics; defaults by ``num_classes``.
        make_digits_if_missing: when ``root`` does not exist, write the digits-VOC set
            there first (:func:`make_digits_voc` defaults; for the quickstart configs).
        batch_size, val_batch_size, num_workers, crop_size, scale_range, hflip, mean, std: loading.
    """

    def __init__(self, *, root: str, num_classes: int = 21, train_split: str = "train", val_split: str = "val",
                 test_split: str | None = None, predict_split: str | None = None,
                 augmented: bool = False, class_names: list[str] | None = None,
                 make_digits_if_missing: bool = False, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int = 4, crop_size: int | tuple[int, int] = 480,
                 scale_range: tuple[float, float] = (0.5, 2.0), hflip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__(root=root, batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         crop_size=crop_size, scale_range=scale_range, hflip=hflip, mean=mean, std=std,
                         train_split=train_split, val_split=val_split, test_split=test_split,
                         predict_split=predict_split)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else default_class_names(num_classes)
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for num_classes={num_classes}")
        self.augmented = augmented
        self.make_digits_if_missing = make_digits_if_missing
        self.save_hyperparameters()  # in the checkpoint: `gdrq export --validate` rebuilds this datamodule

    def prepare_data(self) -> None:
        if self.make_digits_if_missing and not self.root.exists():
            from .digits_voc import make_digits_voc

            make_digits_voc(self.root)

    def setup(self, stage: str | None = None) -> None:
        voc = voc_root(self.root)
        common = {"num_classes": self.num_classes, "mean": self.mean, "std": self.std}
        if stage in (None, "fit") and self.train_set is None:
            aug = voc_augmented(voc) if self.augmented and self.train_split == "train" else None
            self.train_set = voc_dataset(voc, self.train_split, transform=self._train_transform(),
                                         list_file=aug[0] if aug else None,
                                         mask_dir=aug[1] if aug else "SegmentationClass", **common)
            self.train_set.scan_labels(LABEL_SCAN)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = voc_dataset(voc, self.val_split, **common)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = voc_dataset(voc, self.test_split, **common)
        if stage in (None, "predict") and self.predict_set is None:
            self.predict_set = voc_images(voc, self.predict_split, mean=self.mean, std=self.std)


class CityscapesDataModule(_SegmentationDataModule):
    """Cityscapes fine annotations: ``<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
    ``<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png``; label ids map to the 19 train ids
    (everything else 255, see :mod:`.labels`).
    """

    num_classes = 19

    def __init__(self, *, root: str, train_split: str = "train", val_split: str = "val",
                 test_split: str | None = None, predict_split: str | None = None, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int = 4, crop_size: int | tuple[int, int] = 713,
                 scale_range: tuple[float, float] = (0.5, 2.0), hflip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__(root=root, batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         crop_size=crop_size, scale_range=scale_range, hflip=hflip, mean=mean, std=std,
                         train_split=train_split, val_split=val_split, test_split=test_split,
                         predict_split=predict_split)
        self.class_names = list(CITYSCAPES_CLASSES)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        root = cityscapes_root(self.root)
        common = {"mean": self.mean, "std": self.std}
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = cityscapes_dataset(root, self.train_split, transform=self._train_transform(), **common)
            self.train_set.scan_labels(LABEL_SCAN)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = cityscapes_dataset(root, self.val_split, **common)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = cityscapes_dataset(root, self.test_split, **common)
        if stage in (None, "predict") and self.predict_set is None:
            self.predict_set = cityscapes_images(root, self.predict_split, **common)
