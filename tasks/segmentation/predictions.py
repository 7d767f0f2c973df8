"""``predict`` output: one VOC-palette PNG mask per input image, in the run directory.

The masks land in ``<run dir>/predictions/masks/<image id>.png`` (the run directory is
where Lightning keeps the run's logs and checkpoints), at each image's own size: the
predict loader pads a batch to its largest image and :class:`SegmentationModule`'s
``predict_step`` crops every mask back. Pixel values are class indices, so the files
read back like VOC's ``SegmentationClass`` masks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor

from gdrq_lightning.utils.run import run_dir

from .labels import voc_palette

# images [N, 3, H, W] padded to the largest, image ids, original (height, width) of each
PredictBatch = tuple[Tensor, list[str], list[tuple[int, int]]]


def save_palette_mask(mask: Tensor | np.ndarray, path: str | Path) -> Path:
    """Write ``[H, W]`` class indices as a palette (``P`` mode) PNG with the VOC colours."""
    array = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask).astype(np.uint8)
    image = Image.fromarray(array, mode="P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


class PaletteMaskWriter(BasePredictionWriter):
    """Writes each predicted mask of a batch as ``<run dir>/predictions/masks/<id>.png``."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: dict[str, list],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        out = Path(run_dir(trainer)) / "predictions" / "masks"
        for image_id, mask in zip(prediction["ids"], prediction["masks"]):
            save_palette_mask(mask, out / f"{image_id}.png")
