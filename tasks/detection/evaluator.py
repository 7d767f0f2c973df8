"""COCO box evaluation (pycocotools ``COCOeval``) with ``update / compute / reset``.

Distributed runs: every rank collects detections for the images it saw;
``compute`` gathers them with ``torch.distributed.all_gather_object``, rank 0
alone runs COCOeval (it is single-threaded and slow, so running it once saves
time), and the resulting numbers are broadcast so every rank logs identical
values (no ``sync_dist`` reduction needed). Detections are keyed by image id, so
the duplicate images a ``DistributedSampler`` pads with count once.

Only the images that were actually evaluated are scored (``params.imgIds``), so
``limit_val_batches`` / ``fast_dev_run`` give a meaningful number for that subset.
No detections at all gives 0 for every metric. COCO reports -1 where a metric is
undefined (e.g. ``AP_large`` when the ground truth has no large objects); that
convention is kept.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

# stats index in COCOeval.summarize() -> metric name
METRICS = {"mAP": 0, "AP50": 1, "AP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5}


class COCOEvaluator:
    """Accumulates Faster R-CNN outputs and scores them against a ground-truth ``COCO``.

    Args:
        coco_gt: the ground truth (``COCODataModule.val_coco``).
        label_to_cat_id: contiguous model label (1..K) -> COCO category id.

    Example:
        >>> ev = COCOEvaluator(dm.val_coco, dm.label_to_cat_id)  # doctest: +SKIP
        >>> ev.update(model(images), targets); ev.compute()["mAP"]  # doctest: +SKIP
    """

    def __init__(self, coco_gt: COCO, label_to_cat_id: dict[int, int]) -> None:
        self.coco_gt = coco_gt
        self.label_to_cat_id = {int(k): int(v) for k, v in label_to_cat_id.items()}
        unknown = sorted(set(self.label_to_cat_id.values()) - set(coco_gt.getCatIds()))
        if unknown:
            raise ValueError(f"label_to_cat_id maps to category ids {unknown} that the ground truth does not define")
        self.summary = ""
        self.reset()

    def reset(self) -> None:
        self._dets: dict[int, list[dict]] = {}

    @torch.no_grad()
    def update(self, outputs: Iterable[dict[str, Tensor]], targets: Iterable[dict[str, Tensor]]) -> None:
        """Add one batch: ``outputs`` from the detector in eval mode, ``targets`` with ``image_id``."""
        for out, tgt in zip(outputs, targets, strict=True):
            image_id = int(tgt["image_id"])
            boxes = out["boxes"].detach().float().cpu().numpy()
            scores = out["scores"].detach().float().cpu().numpy()
            labels = out["labels"].detach().cpu().numpy()
            dets = []
            for (x0, y0, x1, y1), s, lab in zip(boxes, scores, labels):
                cat = self.label_to_cat_id.get(int(lab))
                if cat is None:
                    raise ValueError(
                        f"detector predicted label {int(lab)} with no category id; known labels: "
                        f"{sorted(self.label_to_cat_id)} (is num_classes larger than the dataset's?)"
                    )
                dets.append({
                    "image_id": image_id, "category_id": cat,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(s),
                })
            self._dets[image_id] = dets

    def _gathered(self) -> dict[int, list[dict]]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self._dets
        parts: list[dict[int, list[dict]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._dets)
        merged: dict[int, list[dict]] = {}
        for part in parts:
            for image_id, dets in (part or {}).items():
                merged.setdefault(image_id, dets)
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

    def _evaluate(self, dets: dict[int, list[dict]]) -> dict[str, float]:
        image_ids = sorted(dets)
        flat = [d for i in image_ids for d in dets[i]]
        if not flat:
            self.summary = "no detections"
            return dict.fromkeys(METRICS, 0.0)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):  # pycocotools prints its progress and table
            coco_dt = self.coco_gt.loadRes(flat)
            ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        self.summary = buf.getvalue()
        stats = np.asarray(ev.stats, dtype=np.float64)
        return {name: float(stats[i]) for name, i in METRICS.items()}
