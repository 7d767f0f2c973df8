"""Does the exported ONNX model predict like the PyTorch model? Both on a val split.

Works for any task whose export network maps an image batch to class scores on dim 1:
per image (classification: top-1) or per pixel (segmentation: pixel accuracy over the
labelled pixels, mask value 255 = ignored, which also leaves out batch padding); and for
detectors (targets are per-image dicts, the network maps one image to boxes, labels and
scores): how many of PyTorch's confident detections ONNX Runtime also finds.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..utils.modules import import_object
from .onnx_export import run_onnxruntime

IGNORE_INDEX = 255  # the "void" label of dense targets (VOC, Cityscapes), not counted


def datamodule_from_config(path: str) -> pl.LightningDataModule:
    """Instantiate the ``data:`` section (``class_path`` + ``init_args``) of a gdrq YAML config."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    data = config.get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{path} has no 'data: {{class_path: ..., init_args: ...}}' section")
    cls = import_object(data["class_path"])
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningDataModule)):
        raise ValueError(f"{path}: data.class_path {data['class_path']!r} is not a LightningDataModule")
    return cls(**(data.get("init_args") or {}))


def onnx_input_shape(onnx_path: str) -> list[int | str]:
    """The declared shape of the ONNX model's first input (a name for a dynamic axis)."""
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _check_input(onnx_path: str, expected: list[int | str], x: Tensor) -> None:
    fixed = [(e, g) for e, g in zip(expected[1:], x.shape[1:]) if isinstance(e, int)]
    if len(expected) != x.dim() or any(e != g for e, g in fixed):
        hint = f"; export with --input-shape {' '.join(map(str, x.shape[1:]))}" if x.dim() == 4 else ""
        raise ValueError(f"the ONNX model {onnx_path} takes input {expected} but the data gives {list(x.shape)}{hint}")


def batch_inputs(batch: Any) -> list[Tensor]:
    """Network inputs of one loader batch: the image tensor, or each image of a detection
    batch (a sequence of ``[3, H, W]`` images) as its own ``[1, 3, H, W]`` batch."""
    images = batch[0]
    return [images] if isinstance(images, Tensor) else [img[None] for img in images]


def val_batches(datamodule: pl.LightningDataModule) -> Iterator[Any]:
    """The validation batches as the model sees them: through the datamodule's
    ``on_after_batch_transfer`` (the on-device half of a task's pipeline, e.g. ``uint8`` to float)."""
    for batch in datamodule.val_dataloader():
        yield datamodule.on_after_batch_transfer(batch, 0)


def calibration_inputs(datamodule: pl.LightningDataModule, count: int) -> list[Tensor]:
    """The first ``count`` network inputs of the validation split (export calibrates on them)."""
    datamodule.setup("validate")
    found: list[Tensor] = []
    for batch in val_batches(datamodule):
        found += batch_inputs(batch)
        if len(found) >= count:
            break
    return found[:count]


@torch.no_grad()
def compare_predictions(model: nn.Module, onnx_path: str, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """Accuracy of the PyTorch model and of ONNX Runtime on the validation split, and their agreement.

    Args:
        model: the export network (one tensor of class scores ``[N, C, ...]`` per batch).
        onnx_path: the exported file.
        datamodule: its ``val_dataloader`` yields ``(images, targets)``; targets ``[N]`` are
            class ids, targets ``[N, H, W]`` per-pixel class ids (255 = not counted).

    Returns:
        ``metric`` (``top1`` or ``pixel_acc``), ``samples`` (images), ``counted`` (images or
        labelled pixels), ``<metric>_pytorch``, ``<metric>_onnxruntime``, ``prediction_agreement``.

    Raises:
        ValueError: the data's images or targets do not fit the model (names both shapes).
    """
    datamodule.setup("validate")
    model = model.eval()
    expected = onnx_input_shape(onnx_path)
    first = next(val_batches(datamodule), None)
    if first is not None and not isinstance(first[1], Tensor):
        return compare_detections(model, onnx_path, datamodule)
    metric = "top1"
    samples = counted = correct_torch = correct_ort = agree = 0
    for x, y in val_batches(datamodule):
        _check_input(onnx_path, expected, x)
        pred_torch = model(x).argmax(1)
        pred_ort = run_onnxruntime(onnx_path, x).argmax(1)
        if pred_torch.shape != y.shape:
            raise ValueError(f"predictions of shape {list(pred_torch.shape)} do not match targets of shape {list(y.shape)}")
        keep = y != IGNORE_INDEX if y.dim() > 1 else torch.ones_like(y, dtype=torch.bool)
        metric = "pixel_acc" if y.dim() > 1 else "top1"
        samples += len(y)
        counted += int(keep.sum())
        correct_torch += int(((pred_torch == y) & keep).sum())
        correct_ort += int(((pred_ort == y) & keep).sum())
        agree += int(((pred_torch == pred_ort) & keep).sum())
    n = max(counted, 1)
    return {
        "metric": metric, "samples": samples, "counted": counted, f"{metric}_pytorch": correct_torch / n,
        f"{metric}_onnxruntime": correct_ort / n, "prediction_agreement": agree / n,
    }


def match_detections(ref: tuple[Tensor, ...], got: tuple[Tensor, ...], *, score: float = 0.5, top: int = 10,
                     iou: float = 0.9) -> tuple[int, int]:
    """``(matched, counted)``: of ``ref``'s detections with score >= ``score`` (the ``top`` best),
    how many ``got`` has with the same label and IoU >= ``iou``. Each is ``(boxes, labels, scores)``."""
    keep = (ref[2] >= score).nonzero().flatten()[:top]
    if not len(keep):
        return 0, 0
    if not len(got[0]):
        return 0, len(keep)
    same = (box_iou(ref[0][keep], got[0]) >= iou) & (ref[1][keep][:, None] == got[1][None, :])
    return int(same.any(dim=1).sum()), len(keep)


@torch.no_grad()
def compare_detections(model: nn.Module, onnx_path: str, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """PyTorch's and ONNX Runtime's detections on each validation image: the fraction of
    PyTorch's confident ones (score >= 0.5, top 10 per image) that ORT finds too (same label,
    IoU >= 0.9), and the images whose detections all match."""
    images = matched = counted = all_match = 0
    for batch in val_batches(datamodule):
        for x in batch_inputs(batch):
            found, total = match_detections(model(x), run_onnxruntime(onnx_path, x))
            images += 1
            matched, counted, all_match = matched + found, counted + total, all_match + (found == total)
    return {"metric": "detection_match", "samples": images, "counted": counted,
            "matched_fraction": matched / max(counted, 1), "images_all_matched": all_match / max(images, 1)}
