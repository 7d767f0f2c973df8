"""What every task's loaders share: DataLoader settings and the on-device half of the pipeline.

Training workers hand over ``uint8`` images: a quarter of float32's bytes through the
workers' shared memory and the host-to-device copy, and no per-pixel float work in the
workers. The DataModule's ``on_after_batch_transfer`` (Lightning calls it on the device,
after the copy) turns them into the float input the model expects with the same
torchvision ops the workers ran before (``to_dtype(scale=True)`` then ``normalize``), so
the model's numerics do not change. Evaluation loaders keep giving model-ready float
batches: they are what direct consumers (``gdrq export --data-config``, scripts) read.
Memory is pinned when the trainer runs on CUDA.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pin_memory(dm: pl.LightningDataModule) -> bool:
    """Pin host memory when the attached trainer computes on CUDA (without a trainer: when CUDA exists)."""
    trainer = getattr(dm, "trainer", None)
    if trainer is not None:
        return trainer.strategy.root_device.type == "cuda"
    return torch.cuda.is_available()


def make_loader(dm: pl.LightningDataModule, dataset: Dataset, *, batch_size: int, num_workers: int,
                shuffle: bool = False, drop_last: bool = False, collate_fn: Callable | None = None,
                sampler: Sampler | None = None) -> DataLoader:
    """A DataLoader with the project's settings: persistent workers, pinned memory on CUDA."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, drop_last=drop_last,
        num_workers=num_workers, collate_fn=collate_fn, persistent_workers=num_workers > 0,
        pin_memory=pin_memory(dm),
    )


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``uint8 [..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std``; float input is returned as is.

    Example:
        >>> normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3).flatten().tolist()
        [1.0, 1.0, 1.0]
    """
    if images.dtype != torch.uint8:
        return images
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(mean), list(std))


def mean_color(mean: Sequence[float]) -> tuple[int, ...]:
    """The ``uint8`` colour closest to ``mean`` (padding that normalises to about 0)."""
    return tuple(int(round(m * 255)) for m in mean)


class NormalizeOnDevice:
    """DataModule mixin: the first element of each batch, if ``uint8``, is normalised after the copy.

    Subclasses set ``mean`` and ``std``.
    """

    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
            return type(batch)([normalize(batch[0], self.mean, self.std), *batch[1:]])
        return batch
