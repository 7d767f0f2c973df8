"""COCO box evaluation with ``update / compute / reset``, gathered to rank 0.

Every rank keeps its detections as one small float32 array per image (``[n, 6]``: x, y, w,
h, score, category id; the detector's float32 values, exactly), not as Python dicts. ``compute`` sends them to rank 0 alone
(``torch.distributed.gather_object``); rank 0 builds the ground-truth index (on first use:
other ranks never parse the json for evaluation), scores the images with COCOeval split
over ``workers`` processes (:mod:`.cocoeval`) and broadcasts the numbers, so every rank
logs identical values. Detections are keyed by image id, so the duplicate images a
``DistributedSampler`` pads with count once.

Only the images that were actually evaluated are scored (``params.imgIds``), so
``limit_val_batches`` / ``fast_dev_run`` give a meaningful number for that subset.
No detections at all gives 0 for every metric. COCO reports -1 where a metric is
undefined (e.g. ``AP_large`` when the ground truth has no large objects); that
convention is kept.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from torch import Tensor

from .cocoeval import default_workers, evaluate

# stats index in COCOeval.summarize() -> metric name
METRICS = {"mAP": 0, "AP50": 1, "AP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5}


def detections_to_rows(output: dict[str, Tensor], lut: np.ndarray, *, drop_unmapped: bool = False) -> np.ndarray:
    """One image's detector output -> ``float32 [n, 6]`` rows ``x, y, w, h, score, category_id``.

    Args:
        output: ``boxes`` (xyxy), ``scores``, ``labels``.
        lut: label -> category id (``-1`` for labels without one).
        drop_unmapped: leave out labels without a category id (with category ids as labels, the
            unused ids in COCO's 1..90) instead of raising.

    Raises:
        ValueError: a label with no category id (names it), unless ``drop_unmapped``.
    """
    boxes = output["boxes"].detach().float().cpu().numpy()
    scores = output["scores"].detach().float().cpu().numpy()
    labels = output["labels"].detach().cpu().numpy().astype(np.int64)
    in_range = (labels >= 0) & (labels < len(lut))
    categories = np.where(in_range, lut[np.where(in_range, labels, 0)], -1)
    if drop_unmapped:
        keep = categories >= 0
        boxes, scores, categories = boxes[keep], scores[keep], categories[keep]
    elif (categories < 0).any():
        raise ValueError(
            f"detector predicted label {labels[categories < 0][0]} with no category id; known labels: "
            f"{np.flatnonzero(lut >= 0).tolist()} (is num_classes larger than the dataset's?)"
        )
    rows = np.empty((len(boxes), 6), dtype=np.float32)  # category ids < 2**24 are exact
    rows[:, 0:2] = boxes[:, 0:2]
    rows[:, 2:4] = boxes[:, 2:4] - boxes[:, 0:2]  # float32 differences, as COCO results always had
    rows[:, 4] = scores
    rows[:, 5] = categories
    return rows


class COCOEvaluator:
    """Accumulates Faster R-CNN outputs and scores them against the COCO ground truth.

    Args:
        ground_truth: a ``COCO`` index, or a function that builds it (called on rank 0 only,
            once, e.g. ``COCODataModule.load_val_coco``).
        label_to_cat_id: model label -> COCO category id.
        workers: processes COCOeval's per-image matching is split over (default: the CPUs
            this process may use, at most 8).
        drop_unmapped: ignore predicted labels without a category id (see :func:`detections_to_rows`).

    Example:
        >>> ev = COCOEvaluator(dm.load_val_coco, dm.label_to_cat_id)  # doctest: +SKIP
        >>> ev.update(model(images), targets); ev.compute()["mAP"]  # doctest: +SKIP
    """

    def __init__(self, ground_truth: COCO | Callable[[], COCO], label_to_cat_id: dict[int, int], *,
                 workers: int | None = None, drop_unmapped: bool = False) -> None:
        self.label_to_cat_id = {int(k): int(v) for k, v in label_to_cat_id.items()}
        self.lut = np.full(max(self.label_to_cat_id, default=0) + 1, -1, dtype=np.int64)
        for label, cat in self.label_to_cat_id.items():
            self.lut[label] = cat
        self._gt: COCO | None = None
        self._load = None if isinstance(ground_truth, COCO) else ground_truth
        if isinstance(ground_truth, COCO):
            self._set_gt(ground_truth)
        self.workers = workers or default_workers()
        self.drop_unmapped = drop_unmapped
        self.summary = ""
        self.reset()

    def _set_gt(self, coco: COCO) -> None:
        unknown = sorted(set(self.label_to_cat_id.values()) - set(coco.getCatIds()))
        if unknown:
            raise ValueError(f"label_to_cat_id maps to category ids {unknown} that the ground truth does not define")
        self._gt = coco

    @property
    def coco_gt(self) -> COCO:
        if self._gt is None:
            self._set_gt(self._load())  # type: ignore[misc]
        return self._gt  # type: ignore[return-value]

    def reset(self) -> None:
        self._dets: dict[int, np.ndarray] = {}

    @torch.no_grad()
    def update(self, outputs: Iterable[dict[str, Tensor]], targets: Iterable[dict[str, Tensor]]) -> None:
        """Add one batch: ``outputs`` from the detector in eval mode, ``targets`` with ``image_id``."""
        for out, tgt in zip(outputs, targets, strict=True):
            self._dets[int(tgt["image_id"])] = detections_to_rows(out, self.lut, drop_unmapped=self.drop_unmapped)

    def _gathered(self) -> dict[int, np.ndarray]:
        """All ranks' detections on rank 0 (its own copy of a repeated image wins); ``{}`` elsewhere."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self._dets
        rank = dist.get_rank()
        parts: list[dict[int, np.ndarray] | None] | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(self._dets, parts, dst=0)
        if rank != 0:
            return {}
        merged: dict[int, np.ndarray] = {}
        for part in parts or []:
            for image_id, rows in (part or {}).items():
                merged.setdefault(image_id, rows)
        return merged

    def compute(self) -> dict[str, float]:
        """``{"mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"}``, identical on every rank."""
        dets = self._gathered()
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        result: list[dict[str, float] | None] = [None]
        if not distributed or dist.get_rank() == 0:
            result[0] = self._evaluate(dets)
        if distributed:
            dist.broadcast_object_list(result, src=0)
        return result[0]  # type: ignore[return-value]

    def _evaluate(self, dets: dict[int, np.ndarray]) -> dict[str, float]:
        image_ids = sorted(dets)
        if not any(len(rows) for rows in dets.values()):
            self.summary = "no detections"
            return dict.fromkeys(METRICS, 0.0)
        results = np.concatenate([np.hstack([np.full((len(dets[i]), 1), i, dtype=np.float64), dets[i].astype(np.float64)])
                                  for i in image_ids])
        stats, self.summary = evaluate(self.coco_gt, results, image_ids, workers=self.workers)
        return {name: float(stats[i]) for name, i in METRICS.items()}
