"""Classification data: embedded digits (default), ImageFolder (ImageNet layout), CIFAR-10 folder.

No downloads anywhere: missing data is an error naming the path that was expected. The
file-based modules take an augmentation preset or explicit options (:mod:`.augment`).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from tasks.digits import load_digits_arrays, split_indices
from tasks.loaders import IMAGENET_MEAN, IMAGENET_STD, NormalizeOnDevice, make_loader

from .augment import Preset, eval_transform, resolve, timm_transforms, train_transform
from .digits_folder import make_digits_folder

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class DigitsDataset(Dataset):
    """scikit-learn digits upsampled to ``size`` px, 3 channels, standardised.

    Training samples get a random shift of up to ``size // 8`` pixels (pad + crop).
    """

    MEAN, STD = 0.25, 0.33  # of the 0..1 digit images

    def __init__(self, indices: np.ndarray, size: int, train: bool) -> None:
        images, labels = load_digits_arrays()
        x = torch.from_numpy(images[indices]).float().div_(255.0)[:, None]
        self.images = (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) - self.MEAN) / self.STD
        self.labels = torch.from_numpy(labels[indices])
        self.train = train
        self.shift = max(size // 8, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = self.images[i]
        if self.train:
            s = self.shift
            padded = F.pad(img, (s, s, s, s), value=-self.MEAN / self.STD)
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            img = padded[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]
        return img.expand(3, -1, -1), self.labels[i]


class DigitsDataModule(pl.LightningDataModule):
    """The embedded default: 1,797 real 8x8 digit scans, fixed seeded 80/20 split.

    Args:
        image_size: side length the 8x8 scans are upsampled to.
        batch_size: per-device batch size.
        num_workers: loader workers (0 is fastest for this in-memory set).
        val_fraction: share of images held out for validation.
        split_seed: seed of the fixed split.
    """

    num_classes = 10

    def __init__(self, image_size: int = 32, batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.2, split_seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        images, _ = load_digits_arrays()
        train_idx, val_idx = split_indices(len(images), self.hparams.val_fraction, self.hparams.split_seed)
        self.train_set = DigitsDataset(train_idx, self.hparams.image_size, train=True)
        self.val_set = DigitsDataset(val_idx, self.hparams.image_size, train=False)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        h = self.hparams
        return make_loader(self, ds, batch_size=h.batch_size, num_workers=h.num_workers, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)


def checked_image_loader(path: str) -> Image.Image:
    """PIL loader whose error names the file that is missing or not an image."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: not a valid image file ({e})") from None


class _FolderDataModule(NormalizeOnDevice, pl.LightningDataModule):
    """Loaders over ``self.train_set`` / ``self.val_set`` (set in ``setup``) and the transforms
    the augmentation options describe (:mod:`.augment`).

    Training batches leave the workers as ``uint8`` and are normalised on the device;
    evaluation batches are normalised float (see :mod:`tasks.loaders`).
    """

    image_size: int  # set by the subclass (CIFAR-10: fixed, so not one of its arguments)

    def _transforms(self) -> tuple[Callable, Callable]:
        h = self.hparams
        if h.timm_transform is not None:
            return timm_transforms(self.image_size, dict(h.timm_transform), self.mean, self.std)
        self.augmentation = resolve(self.image_size, h.augment, crop_scale=h.crop_scale, pad=h.pad,
                                    hflip=h.hflip, resize_ratio=h.resize_ratio)
        return (train_transform(self.image_size, self.augmentation),
                eval_transform(self.image_size, self.augmentation, self.mean, self.std))

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        # drop the ragged last batch (BN statistics), unless that would leave a small set with none
        drop_last = len(self.train_set) > h.batch_size
        return make_loader(self, self.train_set, batch_size=h.batch_size, num_workers=h.num_workers, shuffle=True,
                           drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return make_loader(self, self.val_set, batch_size=h.batch_size, num_workers=h.num_workers)

    test_dataloader = val_dataloader


class ImageFolderDataModule(_FolderDataModule):
    """ImageNet-style folders ``train_dir/<class>/*.jpg`` and ``val_dir/<class>/*.jpg``.

    Args:
        train_dir: training root with one sub-folder per class (default ``root/train``).
        val_dir: validation root with the same class folders (default ``root/val``).
        root: a folder holding ``train/`` and ``val/``.
        image_size: side of the square crops the model sees.
        batch_size: per-device batch size.
        num_workers: loader workers.
        augment: ``auto`` (``small`` up to 64 px, ``imagenet`` above), ``small``, ``imagenet``
            or ``none``; see :mod:`tasks.classification.augment`.
        crop_scale: area range of random-resized crops (switches the crop to that kind).
        pad: padding of pad-and-crop shifts (switches the crop to that kind).
        hflip: random horizontal flips (default: the preset's).
        resize_ratio: evaluation resize of the short side, as a multiple of ``image_size``.
        timm_transform: ``timm.data.create_transform`` arguments, replacing the preset.
        mean / std: normalisation (ImageNet's by default).
        make_digits_if_missing: write the embedded digits as an image folder to ``root``
            (:func:`make_digits_folder`) when ``root`` does not exist yet.
    """

    def __init__(self, train_dir: str | None = None, val_dir: str | None = None, *, root: str | None = None,
                 image_size: int = 224, batch_size: int = 64, num_workers: int = 4, augment: Preset = "auto",
                 crop_scale: tuple[float, float] | None = None, pad: int | None = None, hflip: bool | None = None,
                 resize_ratio: float | None = None, timm_transform: dict[str, Any] | None = None,
                 mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD,
                 make_digits_if_missing: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (train_dir is None or val_dir is None) and root is None:
            raise ValueError("ImageFolderDataModule: set root= (with train/ and val/) or both train_dir= and val_dir=")
        if make_digits_if_missing and root is None:
            raise ValueError("make_digits_if_missing=True needs root= (the folder to write the digits to)")
        self.train_dir = train_dir or os.path.join(root, "train")
        self.val_dir = val_dir or os.path.join(root, "val")
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = image_size
        resolve(image_size, self.hparams.augment, crop_scale=crop_scale, pad=pad, hflip=hflip,
                resize_ratio=resize_ratio)  # bad options fail at construction

    def prepare_data(self) -> None:
        root = self.hparams.root
        if self.hparams.make_digits_if_missing and not os.path.exists(root):
            make_digits_folder(root, image_size=self.hparams.image_size)

    def setup(self, stage: str | None = None) -> None:
        train_tf, val_tf = self._transforms()
        self.train_set = _image_folder(self.train_dir, train_tf)
        self.val_set = _image_folder(self.val_dir, val_tf)
        if self.train_set.classes != self.val_set.classes:
            raise ValueError(f"class folders differ between {self.train_dir} and {self.val_dir}")
        self.num_classes = len(self.train_set.classes)


def _image_folder(root: str, transform: Callable) -> datasets.ImageFolder:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root} (expected <root>/<class_name>/<image files>)")
    try:
        return datasets.ImageFolder(root, transform=transform, loader=checked_image_loader)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no class folders with images in {root}: {e}") from None


class CIFAR10DataModule(_FolderDataModule):
    """CIFAR-10 from a local folder holding ``cifar-10-batches-py/`` (never downloaded).

    Augmentation as :class:`ImageFolderDataModule` (32 px: the ``small`` preset, pad 4), with
    horizontal flips on by default, CIFAR's usual recipe.

    Args:
        root: folder that contains ``cifar-10-batches-py``.
        batch_size: per-device batch size.
        num_workers: loader workers.
        augment, crop_scale, pad, hflip, resize_ratio, timm_transform: see :class:`ImageFolderDataModule`.
    """

    num_classes = 10

    def __init__(self, root: str, batch_size: int = 128, num_workers: int = 4, *, augment: Preset = "small",
                 crop_scale: tuple[float, float] | None = None, pad: int | None = None, hflip: bool | None = True,
                 resize_ratio: float | None = None, timm_transform: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.image_size = 32  # not in hparams: the checkpoint's arguments must rebuild this class
        self.mean, self.std = CIFAR_MEAN, CIFAR_STD

    def setup(self, stage: str | None = None) -> None:
        root = self.hparams.root
        if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
            raise FileNotFoundError(f"CIFAR-10 not found: {root}/cifar-10-batches-py is missing (downloads are disabled)")
        train_tf, val_tf = self._transforms()
        self.train_set = datasets.CIFAR10(root, train=True, download=False, transform=train_tf)
        self.val_set = datasets.CIFAR10(root, train=False, download=False, transform=val_tf)
