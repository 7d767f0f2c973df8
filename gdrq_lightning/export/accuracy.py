"""Does the exported ONNX model classify like the PyTorch model? Top-1 of both on a val split."""
from __future__ import annotations

import importlib
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from torch import nn

from .onnx_export import run_onnxruntime


def datamodule_from_config(path: str) -> pl.LightningDataModule:
    """Instantiate the ``data:`` section (``class_path`` + ``init_args``) of a gdrq YAML config."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    data = config.get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{path} has no 'data: {{class_path: ..., init_args: ...}}' section")
    module_name, _, class_name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningDataModule)):
        raise ValueError(f"{path}: data.class_path {data['class_path']!r} is not a LightningDataModule")
    return cls(**(data.get("init_args") or {}))


@torch.no_grad()
def compare_top1(model: nn.Module, onnx_path: str, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """Top-1 of the PyTorch model and of ONNX Runtime on the validation split, and their agreement."""
    datamodule.setup("validate")
    model = model.eval()
    n = correct_torch = correct_ort = agree = 0
    for x, y in datamodule.val_dataloader():
        pred_torch = model(x).argmax(1)
        pred_ort = run_onnxruntime(onnx_path, x).argmax(1)
        n += len(y)
        correct_torch += int((pred_torch == y).sum())
        correct_ort += int((pred_ort == y).sum())
        agree += int((pred_torch == pred_ort).sum())
    return {"samples": n, "top1_pytorch": correct_torch / n, "top1_onnxruntime": correct_ort / n, "prediction_agreement": agree / n}
