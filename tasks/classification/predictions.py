"""``gdrq predict`` output of a classifier: ``<run dir>/predictions/classes.csv``.

One row per image of the predict split, in the split's order: ``index`` (position in the
split), ``file`` (the image file, where the data set has files, e.g. an image folder),
``class`` (the predicted class index), ``name`` (the class folder's name, else the index)
and ``probability`` (its softmax probability). Every rank's images are gathered, each once.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor

from gdrq_lightning.utils.run import run_dir

Row = tuple[int, int, float]  # index, class, probability


def _dataset(trainer: pl.Trainer) -> Any:
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    return getattr(loader, "dataset", None)


def write_rows(rows: list[Row], path: Path, dataset: Any = None) -> Path:
    """The CSV from ``(index, class, probability)`` rows, sorted by index."""
    classes = getattr(dataset, "classes", None)
    samples = getattr(dataset, "samples", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["index", "file", "class", "name", "probability"])
        for index, label, prob in sorted(rows):
            file = samples[index][0] if samples is not None and index < len(samples) else ""
            name = classes[label] if classes is not None and label < len(classes) else str(label)
            out.writerow([index, file, label, name, f"{prob:.4f}"])
    return path


class ClassPredictionWriter(BasePredictionWriter):
    """Collects ``predict`` outputs (class probabilities ``[N, C]``) into ``predictions/classes.csv``."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.rows: list[Row] = []
        self._seen = 0

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows, self._seen = [], 0

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Tensor,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        prob, label = prediction.detach().float().cpu().max(dim=1)
        n = len(label)
        indices = list(batch_indices) if batch_indices is not None and len(batch_indices) == n else range(self._seen, self._seen + n)
        self._seen += n
        self.rows.extend(zip((int(i) for i in indices), label.tolist(), prob.tolist()))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(self.rows, parts, dst=0)
            rows = sorted({r[0]: r for part in parts or [] for r in part or []}.values())  # padded samples once
        if trainer.is_global_zero:
            write_rows(rows, Path(run_dir(trainer)) / "predictions" / "classes.csv", _dataset(trainer))
