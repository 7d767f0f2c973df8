"""ONNX export through the TorchScript exporter, checked and runnable in ONNX Runtime.

The graph (opset 17 by default, 13 at least for per-channel QDQ) has constant
``DequantizeLinear`` weights, QCDQ activations (see :mod:`.qdq`), BatchNorm folded
into the quantized convs, and a dynamic batch axis. ``onnx`` / ``onnxruntime`` are
the optional ``export`` extra, imported only here.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from .fold import fold_groups_into_bn
from .layers import INTEGER_LAYER_TYPES
from .qdq import build_qdq_model

DEFAULT_OPSET = 17


def _folded(model: nn.Module) -> nn.Module:
    if any(isinstance(m, INTEGER_LAYER_TYPES) for m in model.modules()):
        return model
    return fold_groups_into_bn(model)


def export_qdq(
    qdq_model: nn.Module, example_input: Tensor, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET
) -> Path:
    """Export an export-form model (:func:`build_qdq_model`) and run ``onnx.checker`` on the file.

    Raises:
        ValueError: ``opset < 13`` (per-channel Quantize/DequantizeLinear need 13).
        onnx.checker.ValidationError: the graph is not valid ONNX.
    """
    import onnx

    if opset < 13:
        raise ValueError(f"opset={opset} is too old: per-channel QuantizeLinear/DequantizeLinear need opset >= 13")
    path = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter, chosen on purpose
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(
            qdq_model.eval(), (example_input,), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, do_constant_folding=True,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def to_onnx(model: nn.Module, example_input: Tensor, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export a quantized model to ONNX with QDQ weights and QCDQ activations.

    Args:
        model: a fake-quant model from ``quantize_model`` (folded on a copy here) or a
            model already folded by :func:`fold_groups_into_bn`. Single-tensor output.
        example_input: one batch for tracing; the batch axis is exported as dynamic.
        path: the ``.onnx`` file to write.
        opset: ONNX opset, >= 13.

    Returns:
        ``path``, after ``onnx.checker.check_model(full_check=True)`` passed.
    """
    qdq = build_qdq_model(_folded(model), example_input)
    return export_qdq(qdq, example_input, path, opset=opset)


def run_onnxruntime(path: str | os.PathLike, x: Tensor, *, optimize: bool = False) -> Tensor:
    """Run the exported model on CPU.

    ``optimize=False`` disables graph optimizations so the QDQ nodes execute as
    written (reference semantics). With them on (even ``ORT_ENABLE_BASIC``), ORT's
    QDQ transformers rewrite the graph towards integer kernels and low-bit outputs
    move noticeably (resnet18 W4A4, random weights: up to ~0.3 of the logit scale);
    the session option ``session.disable_quant_qdq=1`` restores exact agreement.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x.detach().cpu().numpy()})[:1]
    return torch.from_numpy(out)


def op_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each op type the graph has (QDQ nodes are visible here)."""
    import onnx

    return dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node))
