"""``gdrq export --validate``: the written ONNX file in ONNX Runtime's default session against the
PyTorch network, over the validation split of the run's own datamodule, on the task's own metric.

A task names its metric through the optional contract method ``export_metric(datamodule)``
(:mod:`gdrq_lightning.task`), an object with ``update(outputs, batch)`` and ``compute()``; the
library brings the usual ones (:class:`Top1`, :class:`MeanIoU`, :class:`DetectionMetric` around a
COCO evaluator) and picks :class:`Top1` / :class:`MeanIoU` from the targets' shape for a task
without one. Next to the two metrics it measures how often the two runtimes agree:

* class scores per image (``[N, C]``): top-1 agreement, and per image the largest logit
  difference over the image's largest PyTorch logit (median and max);
* per pixel (``[N, C, H, W]``): the share of labelled pixels (target != 255) and of all pixels
  that get the same class;
* detections (``(boxes, labels, scores)`` per image): the share of PyTorch's boxes that ONNX
  Runtime finds again with the same label at IoU >= 0.9 (all boxes, and those with score >= 0.5).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .accuracy import IGNORE_INDEX, _check_input, batch_inputs, onnx_input_shape, val_batches
from .onnx_export import ort_session

Outputs = list[tuple[Tensor, ...]]  # the export network's outputs for each network input of a batch


class ExportMetric(Protocol):
    """A task metric over export-network outputs (one tuple per :func:`batch_inputs` entry)."""

    def update(self, outputs: Outputs, batch: Any) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Top1:
    """Top-1 accuracy of class scores ``[N, C]`` against class ids ``batch[1]``."""

    def __init__(self) -> None:
        self.correct = self.count = 0

    def update(self, outputs: Outputs, batch: Any) -> None:
        scores = torch.cat([o[0] for o in outputs])
        self.correct += int((scores.argmax(1) == batch[1].cpu()).sum())
        self.count += len(scores)

    def compute(self) -> dict[str, float]:
        return {"top1": self.correct / max(self.count, 1)}


class MeanIoU:
    """mIoU (over classes present in target or prediction) and pixel accuracy of score maps
    ``[N, C, H, W]`` against masks ``batch[1]`` (``ignore_index`` not counted)."""

    def __init__(self, num_classes: int | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confmat: Tensor | None = None

    def update(self, outputs: Outputs, batch: Any) -> None:
        scores = torch.cat([o[0] for o in outputs])
        n = self.num_classes or scores.shape[1]
        target, pred = batch[1].cpu().reshape(-1), scores.argmax(1).reshape(-1)
        keep = target != self.ignore_index
        counts = torch.bincount(target[keep] * n + pred[keep], minlength=n * n).reshape(n, n)
        self.confmat = counts if self.confmat is None else self.confmat + counts

    def compute(self) -> dict[str, float]:
        cm = (torch.zeros(1, 1) if self.confmat is None else self.confmat).double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        return {"mIoU": float(iou.nanmean()), "pixel_acc": float(tp.sum() / cm.sum().clamp_min(1))}


class DetectionMetric:
    """A COCO-style evaluator (``update(list of {boxes, labels, scores}, targets)``, ``compute()``)
    fed with a detector export's ``(boxes, labels, scores)`` per image and the batch's targets."""

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator

    def update(self, outputs: Outputs, batch: Any) -> None:
        dets = [{"boxes": b, "labels": lab, "scores": s} for b, lab, s in outputs]
        self.evaluator.update(dets, list(batch[1]))

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.evaluator.compute().items()}


class Agreement:
    """How often ONNX Runtime gives PyTorch's answer (module docstring)."""

    def __init__(self, iou: float = 0.9, confident: float = 0.5) -> None:
        self.iou, self.confident = iou, confident
        self.kind, self.counts, self.errors = "", dict.fromkeys(("same", "total", "same_all", "total_all"), 0), []

    def update(self, ours: Outputs, theirs: Outputs, batch: Any) -> None:
        for a, b in zip(ours, theirs):
            if len(a) == 3 and a[0].dim() == 2 and a[0].shape[-1] == 4:
                self.kind = "detection"
                self._boxes(a, b)
            elif a[0].dim() == 2:
                self.kind = "classification"
                self.counts["same"] += int((a[0].argmax(1) == b[0].argmax(1)).sum())
                self.counts["total"] += len(a[0])
                self.errors.append((a[0] - b[0]).abs().amax(1) / a[0].abs().amax(1).clamp_min(1e-12))
            else:
                self.kind = "segmentation"
                same = a[0].argmax(1) == b[0].argmax(1)
                labelled = batch[1].cpu() != IGNORE_INDEX if isinstance(batch[1], Tensor) else torch.ones_like(same)
                self.counts["same"] += int((same & labelled).sum())
                self.counts["total"] += int(labelled.sum())
                self.counts["same_all"] += int(same.sum())
                self.counts["total_all"] += same.numel()

    def _boxes(self, a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> None:
        from torchvision.ops import box_iou

        found = torch.zeros(len(a[0]), dtype=torch.bool)
        if len(a[0]) and len(b[0]):
            found = ((box_iou(a[0].float(), b[0].float()) >= self.iou) & (a[1][:, None] == b[1][None, :])).any(1)
        confident = a[2] >= self.confident
        self.counts["same_all"] += int(found.sum())
        self.counts["total_all"] += len(found)
        self.counts["same"] += int((found & confident).sum())
        self.counts["total"] += int(confident.sum())

    def compute(self) -> dict[str, float]:
        c = self.counts
        if self.kind == "classification":
            err = torch.cat(self.errors) if self.errors else torch.zeros(1)
            return {"top1_agreement": c["same"] / max(c["total"], 1), "median_rel_logit_error": float(err.median()),
                    "max_rel_logit_error": float(err.max())}
        if self.kind == "segmentation":
            return {"pixel_agreement": c["same"] / max(c["total"], 1), "pixel_agreement_all": c["same_all"] / max(c["total_all"], 1)}
        return {"box_agreement": c["same_all"] / max(c["total_all"], 1), "boxes": c["total_all"],
                "box_agreement_confident": c["same"] / max(c["total"], 1), "boxes_confident": c["total"]}


def default_metric(batch: Any) -> ExportMetric | None:
    """The library's metric for a task without ``export_metric``: from the targets' shape."""
    target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if not isinstance(target, Tensor):
        return None
    return Top1() if target.dim() == 1 else MeanIoU()


def _progress(total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="validate (PyTorch | ONNX Runtime)", unit="batch", file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False)


@torch.no_grad()
def validate_onnx(network: nn.Module, onnx_path: str, datamodule: Any,
                  metric: Callable[[], ExportMetric | None] | None = None) -> dict[str, Any]:
    """Run ``network`` and the ONNX file (ORT's default session options) over the validation split.

    Args:
        network: the export network (``export_network()``), on the CPU.
        onnx_path: the exported file.
        datamodule: a LightningDataModule; its ``val_dataloader`` after ``setup("validate")``.
        metric: makes a fresh task metric (called twice: PyTorch's and ORT's); default: by targets.

    Returns:
        ``{"samples", "pytorch": {metric: value}, "onnxruntime": {...}, "agreement": {...}}``.

    Raises:
        ValueError: the data's images do not fit the ONNX file's input (names both shapes).
    """
    datamodule.setup("validate")
    network = network.eval()
    session = ort_session(onnx_path, threads=0)  # 0: ONNX Runtime's default thread count
    expected = onnx_input_shape(onnx_path)
    metrics: list[ExportMetric | None] = []
    agreement, samples = Agreement(), 0
    loader = datamodule.val_dataloader()
    bar = _progress(len(loader) if hasattr(loader, "__len__") else None)
    for batch in val_batches(datamodule):
        if not metrics:
            metrics = [m() if m is not None else default_metric(batch) for m in (metric, metric)]
        inputs = batch_inputs(batch)
        ours, theirs = [], []
        for x in inputs:
            _check_input(onnx_path, expected, x)
            out = network(x)
            ours.append(tuple(t.cpu() for t in (out if isinstance(out, (tuple, list)) else (out,))))
            theirs.append(tuple(torch.from_numpy(o) for o in session.run(None, {"input": x.detach().cpu().numpy()})))
        for m, outputs in zip(metrics, (ours, theirs)):
            if m is not None:
                m.update(outputs, batch)
        agreement.update(ours, theirs, batch)
        samples += sum(len(x) for x in inputs)
        bar.update(1)
    bar.close()
    result = [m.compute() if m is not None else {} for m in metrics] or [{}, {}]
    return {"samples": samples, "pytorch": result[0], "onnxruntime": result[1], "agreement": agreement.compute()}


def format_validation(result: dict[str, Any]) -> str:
    """The side-by-side table ``gdrq export --validate`` prints."""
    rows = [f"{'metric':<26}{'PyTorch':>12}{'ONNX Runtime':>14}"]
    rows += [f"{k:<26}{v:>12.4f}{result['onnxruntime'].get(k, float('nan')):>14.4f}" for k, v in result["pytorch"].items()]
    rows += [f"{k:<26}{v:>26.4g}" for k, v in result["agreement"].items()]
    return "\n".join([f"validation: {result['samples']} images", *rows])
