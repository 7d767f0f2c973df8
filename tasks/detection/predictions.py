"""Detection outputs a user can open: a COCO results json, boxes drawn on the images.

``gdrq predict`` writes ``<run dir>/predictions/detections.json`` in COCO's results format
(``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``, what
``COCO.loadRes`` and the evaluation server read), gathered from every rank, each image once;
with ``COCODataModule(draw_predictions=True)`` also ``<run dir>/predictions/boxes/<image id>.png``
(a data option: ``gdrq predict --ckpt_path`` takes the model's options from the checkpoint). Validation
draws the first images with their ground truth (green) and predictions into
``<run dir>/predictions/val_epochNNN.png`` and attaches it to W&B. Small images are drawn
enlarged (at least :data:`MIN_DRAWN_SIDE` px a side, e.g. 3x for the 96 px digits) so the
``name score`` labels, in a TrueType font, can be read.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from gdrq_lightning.utils.run import run_dir

from .evaluator import detections_to_rows

GROUND_TRUTH_COLOR = (0, 200, 0)
MIN_DRAWN_SIDE = 288  # px: a drawn image is enlarged by a whole factor up to at least this size
LABEL_FONT_SIZE = 14


@functools.lru_cache(maxsize=1)
def label_font() -> str | None:
    """A TrueType font file for the labels (matplotlib's DejaVu Sans); None: PIL's tiny bitmap font."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except (ImportError, ValueError):
        return None


def draw_scale(height: int, width: int) -> int:
    """The whole enlargement factor that brings the longer side to at least ``MIN_DRAWN_SIDE``."""
    return max(1, -(-MIN_DRAWN_SIDE // max(height, width, 1)))


def to_uint8(image: Tensor) -> Tensor:
    """A detector input (float 0..1 or ``uint8``) as ``uint8 [3, H, W]`` on the CPU."""
    image = image.detach().cpu()
    return image if image.dtype == torch.uint8 else image.clamp(0, 1).mul(255).round().to(torch.uint8)


def _color(label: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(label)  # a fixed, distinct colour per label
    return tuple(int(v) for v in rng.integers(64, 256, 3))  # type: ignore[return-value]


def draw(image: Tensor, output: dict[str, Tensor], names: dict[int, str], *, score_thresh: float = 0.5,
         target: dict[str, Tensor] | None = None, scale: int | None = None) -> Tensor:
    """``uint8 [3, s*H, s*W]`` with the ground truth (green, optional) and the detections above
    ``score_thresh`` (one colour per label, ``name score``), enlarged ``s`` times (default:
    :func:`draw_scale`; pixels kept square, boxes scaled with them)."""
    canvas = to_uint8(image)
    s = draw_scale(*canvas.shape[1:]) if scale is None else scale
    if s > 1:
        canvas = canvas.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
    font = label_font()
    if target is not None and len(target["boxes"]):
        canvas = draw_bounding_boxes(canvas, target["boxes"].cpu().float() * s, colors=GROUND_TRUTH_COLOR, width=2)
    keep = output["scores"].detach().cpu() >= score_thresh
    boxes, labels, scores = output["boxes"].detach().cpu()[keep], output["labels"].cpu()[keep], output["scores"].cpu()[keep]
    if len(boxes):
        text = [f"{names.get(int(lab), int(lab))} {float(sc):.2f}" for lab, sc in zip(labels, scores)]
        canvas = draw_bounding_boxes(canvas, boxes.float() * s, labels=text, colors=[_color(int(lab)) for lab in labels],
                                     width=3, font=font, font_size=LABEL_FONT_SIZE if font else None, fill_labels=True,
                                     label_colors="black")  # dark text on a box-coloured tag
    return canvas


def save_png(image: Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


def save_grid(images: Sequence[Tensor], outputs: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]],
              names: dict[int, str], path: str | Path, *, score_thresh: float = 0.5) -> Path:
    """Up to 4 drawn images per row (padded to the largest) in one PNG."""
    drawn = [draw(x, o, names, score_thresh=score_thresh, target=t) for x, o, t in zip(images, outputs, targets)]
    height, width = max(d.shape[1] for d in drawn), max(d.shape[2] for d in drawn)
    padded = [torch.nn.functional.pad(d, (0, width - d.shape[2], 0, height - d.shape[1])) for d in drawn]
    return save_png(make_grid(padded, nrow=min(4, len(padded)), padding=2, pad_value=255), path)


def label_names(trainer: pl.Trainer) -> tuple[dict[int, int], dict[int, str]]:
    """Label -> category id and label -> class name from the trainer's datamodule (identity / the id without one)."""
    dm = getattr(trainer, "datamodule", None)
    try:
        to_cat = dict(dm.label_to_cat_id)
        return to_cat, {label: name for label, name in zip(sorted(to_cat), dm.class_names)}
    except (AttributeError, RuntimeError, TypeError):
        return {}, {}


class COCOResultsWriter(BasePredictionWriter):
    """Collects ``predict`` detections into a COCO results json (and optional PNGs with the boxes).

    Args:
        draw: also write one PNG per image with the detections drawn (default: the
            datamodule's ``draw_predictions``).
        score_thresh: detections drawn (the json keeps all the detector returns).
    """

    def __init__(self, *, draw: bool | None = None, score_thresh: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.draw_option, self.score_thresh = draw, score_thresh
        self.rows: dict[int, np.ndarray] = {}

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = {}
        self.to_cat, self.names = label_names(trainer)
        dm_option = getattr(getattr(trainer, "datamodule", None), "draw_predictions", False)
        self.draw = dm_option if self.draw_option is None else self.draw_option

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: list[dict[str, Tensor]],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, targets = batch
        lut = _lut(self.to_cat, prediction)
        out_dir = Path(run_dir(trainer)) / "predictions" / "boxes"
        for image, target, output in zip(images, targets, prediction):
            image_id = int(target["image_id"])
            self.rows[image_id] = detections_to_rows(output, lut, drop_unmapped=True)
            if self.draw:
                save_png(draw(image, output, self.names, score_thresh=self.score_thresh), out_dir / f"{image_id}.png")

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(self.rows, parts, dst=0)
            rows = {k: v for part in reversed(parts or []) for k, v in (part or {}).items()}
        if trainer.is_global_zero:
            write_results(rows, Path(run_dir(trainer)) / "predictions" / "detections.json")


def _lut(to_cat: dict[int, int], prediction: list[dict[str, Tensor]]) -> np.ndarray:
    """Label -> category id; without a mapping the label is the category id."""
    top = max([*to_cat, *(int(o["labels"].max()) for o in prediction if len(o["labels"]))], default=0)
    lut = np.arange(top + 1, dtype=np.int64) if not to_cat else np.full(top + 1, -1, dtype=np.int64)
    for label, cat in to_cat.items():
        lut[label] = cat
    return lut


def write_results(rows: dict[int, np.ndarray], path: Path) -> Path:
    """COCO results json from per-image rows ``x, y, w, h, score, category_id``."""
    results = [
        {"image_id": image_id, "category_id": int(r[5]), "bbox": [round(float(v), 2) for v in r[:4]],
         "score": round(float(r[4]), 4)}
        for image_id in sorted(rows) for r in rows[image_id]
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path
