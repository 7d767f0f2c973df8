"""ONNX file sizes of ResNet-18 (1000 classes, 224 px, random weights): FP32 (``torch.onnx.export``)
against GDRQ W4A4 written by ``to_onnx`` with int8 weight containers and with INT4 weights.

Usage: python benchmarks/onnx_sizes.py
"""
from __future__ import annotations

import os
import tempfile

import torch
import torchvision

from gdrq_lightning import QuantConfig
from gdrq_lightning.export import to_onnx
from gdrq_lightning.quant import quantize_model


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    folder = tempfile.mkdtemp(prefix="gdrq_sizes_")
    torch.onnx.export(model, x, f"{folder}/fp32.onnx", dynamo=False)
    quantize_model(model, QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4)).eval()
    with torch.no_grad():
        model(x)
    for fmt in ("int8", "int4"):
        to_onnx(model, x, f"{folder}/{fmt}.onnx", weight_format=fmt)
    base = os.path.getsize(f"{folder}/fp32.onnx")
    for name in ("fp32", "int8", "int4"):
        size = os.path.getsize(f"{folder}/{name}.onnx")
        print(f"{name:5s} {size / 1e6:6.1f} MB  {base / size:.2f}x smaller than FP32")


if __name__ == "__main__":
    main()
