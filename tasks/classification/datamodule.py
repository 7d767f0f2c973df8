"""Classification data: embedded digits (default), ImageFolder (ImageNet layout), CIFAR-10 folder.

No downloads anywhere: missing data is an error naming the path that was expected.
"""
from __future__ import annotations

import os

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2 as T

from tasks.digits import load_digits_arrays, split_indices

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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
        return DataLoader(ds, batch_size=h.batch_size, shuffle=shuffle, num_workers=h.num_workers, persistent_workers=h.num_workers > 0)

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


class _FolderDataModule(pl.LightningDataModule):
    """Loaders over ``self.train_set`` / ``self.val_set`` (set in ``setup``) from
    ``batch_size`` / ``num_workers`` hyper-parameters."""

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        # drop the ragged last batch (BN statistics), unless that would leave a small set with none
        drop_last = len(self.train_set) > h.batch_size
        return DataLoader(self.train_set, batch_size=h.batch_size, shuffle=True, num_workers=h.num_workers, drop_last=drop_last, persistent_workers=h.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(self.val_set, batch_size=h.batch_size, num_workers=h.num_workers, persistent_workers=h.num_workers > 0)

    test_dataloader = val_dataloader


class ImageFolderDataModule(_FolderDataModule):
    """ImageNet-style folders ``train_dir/<class>/*.jpg`` and ``val_dir/<class>/*.jpg``.

    Args:
        train_dir: training root with one sub-folder per class.
        val_dir: validation root with the same class folders.
        image_size: crop size (train: RandomResizedCrop, val: resize to 1.14x + center crop).
        batch_size: per-device batch size.
        num_workers: loader workers.
    """

    def __init__(self, train_dir: str, val_dir: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        norm = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        train_tf = T.Compose([T.RandomResizedCrop(h.image_size, antialias=True), T.RandomHorizontalFlip(), *norm])
        val_tf = T.Compose([T.Resize(int(round(h.image_size * 1.143)), antialias=True), T.CenterCrop(h.image_size), *norm])
        self.train_set = _image_folder(h.train_dir, train_tf)
        self.val_set = _image_folder(h.val_dir, val_tf)
        if self.train_set.classes != self.val_set.classes:
            raise ValueError(f"class folders differ between {h.train_dir} and {h.val_dir}")
        self.num_classes = len(self.train_set.classes)


def _image_folder(root: str, transform: T.Compose) -> datasets.ImageFolder:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root} (expected <root>/<class_name>/<image files>)")
    try:
        return datasets.ImageFolder(root, transform=transform, loader=checked_image_loader)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no class folders with images in {root}: {e}") from None


class CIFAR10DataModule(_FolderDataModule):
    """CIFAR-10 from a local folder holding ``cifar-10-batches-py/`` (never downloaded).

    Args:
        root: folder that contains ``cifar-10-batches-py``.
        batch_size: per-device batch size.
        num_workers: loader workers.
    """

    num_classes = 10

    def __init__(self, root: str, batch_size: int = 128, num_workers: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        root = self.hparams.root
        if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
            raise FileNotFoundError(f"CIFAR-10 not found: {root}/cifar-10-batches-py is missing (downloads are disabled)")
        norm = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
        self.train_set = datasets.CIFAR10(root, train=True, download=False, transform=T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm]))
        self.val_set = datasets.CIFAR10(root, train=False, download=False, transform=T.Compose(norm))
