"""ONNX export through the TorchScript exporter, checked, and run in ONNX Runtime's default session.

The graph (opset 17 by default, 13 at least for per-channel QDQ) is the export form of
:mod:`.qdq`: ``DequantizeLinear`` weights, Q/Clip/DQ activations, BatchNorm folded into the
quantized layers, int32 biases where a layer becomes an integer kernel. ``weight_format="int4"``
exports at opset 20 and rewrites weight codes that fit 4 bits as INT4 initializers (opset 21,
whose changes over 20 only add types). Axes are dynamic as the network's :class:`OnnxSpec`
says (default: batch, height and width). ``onnx`` / ``onnxruntime`` are the optional
``export`` extra, imported only here.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .build import build_qdq_model
from .deploy_export import deploy_qdq_model, is_deployed
from .fold import fold_groups_into_bn
from .integer import pack_bits
from .layers import INTEGER_LAYER_TYPES
from .qdq import QDQWeightLayer
from .wiring import as_args

DEFAULT_OPSET = 17
INT4_OPSET = 21
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger")
FLOAT_LAYER_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "MatMulNBits")


@dataclass(frozen=True)
class OnnxSpec:
    """How a network is exported: its output names and which axes are dynamic. A network may
    carry one as ``onnx_spec`` (a task's ``export_network()`` sets it); the default is one
    output with a dynamic batch and image size.

    ``fixed_size_reason`` says why an image size is fixed (e.g. PSPNet's pooling bins).
    """

    outputs: tuple[str, ...] = ("output",)
    dynamic_batch: bool = True
    dynamic_size: bool = True
    fixed_size_reason: str = ""

    def dynamic_axes(self, input_rank: int, output_ranks: list[int]) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes``: axis 0 of every output (batch, or a count of
        detections), spatial axes of 4-D inputs and outputs when the size is dynamic."""
        spatial = {2: "height", 3: "width"} if self.dynamic_size and input_rank == 4 else {}
        axes = {"input": ({0: "batch"} if self.dynamic_batch else {}) | spatial}
        for name, rank in zip(self.outputs, output_ranks):
            first = "batch" if self.dynamic_batch else f"{name}_count"
            axes[name] = {0: first} | ({2: "out_height", 3: "out_width"} if spatial and rank == 4 else {})
        return axes


def onnx_spec(model: nn.Module) -> OnnxSpec:
    """The network's :class:`OnnxSpec` (its ``onnx_spec`` attribute), or the default."""
    spec = getattr(model, "onnx_spec", None)
    return spec if isinstance(spec, OnnxSpec) else OnnxSpec()


def _folded(model: nn.Module) -> nn.Module:
    if any(isinstance(m, INTEGER_LAYER_TYPES) for m in model.modules()):
        return model
    return fold_groups_into_bn(model)


def export_qdq(
    qdq_model: nn.Module,
    example_input: Any,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    spec: OnnxSpec | None = None,
) -> Path:
    """Export an export-form model (:func:`build_qdq_model`) and run ``onnx.checker`` on the file.

    INT4 weights (layers built with ``weight_format="int4"``) make the file opset 21.

    Raises:
        ValueError: ``opset < 13`` (per-channel Quantize/DequantizeLinear need 13).
        onnx.checker.ValidationError: the graph is not valid ONNX.
    """
    import onnx

    if opset < 13:
        raise ValueError(f"opset={opset} is too old: per-channel QuantizeLinear/DequantizeLinear need opset >= 13")
    spec = spec or onnx_spec(qdq_model)
    int4 = [f"{n}.codes" for n, m in qdq_model.named_modules()
            if isinstance(m, QDQWeightLayer) and m.int4 and m.float_weight is None]
    args = as_args(example_input)
    with torch.no_grad():
        out = qdq_model.eval()(*args)
    ranks = [t.dim() for t in (out if isinstance(out, (tuple, list)) else (out,))]
    path = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter, chosen on purpose
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            qdq_model, args, str(path), dynamo=False, opset_version=max(opset, INT4_OPSET - 1) if int4 else opset,
            input_names=["input"], output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes(args[0].dim(), ranks), do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    if int4:
        proto = _int4_weights(proto, set(int4))
        onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)
    return path


def _int4_weights(proto: Any, names: set[str]) -> Any:
    """Store the weight codes ``names`` (int8 values in [-8, 7], DQ without zero point) as INT4; opset 21."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer if i.name in names}
    for name, init in inits.items():
        codes = numpy_helper.to_array(init)
        graph.initializer.remove(init)
        packed = pack_bits(torch.from_numpy(codes.astype("int32")) & 0xF, 4).numpy().tobytes()  # low nibble first, as ONNX
        graph.initializer.append(onnx.helper.make_tensor(name, onnx.TensorProto.INT4, codes.shape, packed, raw=True))
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = INT4_OPSET
    proto.ir_version = max(proto.ir_version, 10)
    return proto


def to_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    weight_format: str = "int8",
    calibration: list[Any] | None = None,
    float_outputs: bool = False,
) -> Path:
    """Export a quantized model to ONNX in the QDQ form ONNX Runtime turns into integer kernels.

    Args:
        model: a fake-quant model from ``quantize_model`` (folded on a copy here) or a model
            already folded by :func:`fold_groups_into_bn`; its outputs are tensors.
        example_input: one batch for tracing (or a tuple of model arguments); the axes the
            model's :class:`OnnxSpec` names are exported as dynamic.
        path: the ``.onnx`` file to write.
        opset: ONNX opset, >= 13 (``weight_format="int4"`` writes 21).
        weight_format: ``"int8"`` (codes in int8 containers: integer kernels in ORT) or
            ``"int4"`` (codes of <= 4-bit layers as INT4: the smallest file; ORT runs those
            layers in float, exactly).
        calibration: inputs that set the 8-bit grids of float outputs made integer (a residual
            branch before its add, an FPN output); default ``[example_input]``. Use real images.
        float_outputs: keep those layers float instead: ORT then runs the fake-quant model's
            arithmetic (up to the int32 biases' rounding), with fewer integer kernels.

    A model in deploy form (:func:`~.deploy.simulate_deploy`) is written as it computes: its
    grids and integer layers as trained, ``calibration`` unused.

    Returns:
        ``path``, after ``onnx.checker.check_model(full_check=True)`` passed.

    Raises:
        ValueError: ``weight_format="int4"`` or ``float_outputs`` for a deploy-form model (both
            write float layers where it computes integer ones).
    """
    if is_deployed(model):
        check_deploy_options(weight_format, float_outputs)
        return export_qdq(deploy_qdq_model(model, example_input), example_input, path, opset=opset, spec=onnx_spec(model))
    qdq = build_qdq_model(_folded(model), example_input, weight_format=weight_format, calibration=calibration,
                          float_outputs=float_outputs)
    return export_qdq(qdq, example_input, path, opset=opset, spec=onnx_spec(model))


def check_deploy_options(weight_format: str, float_outputs: bool) -> None:
    """A deploy-form model exports as it computes: int8 integer kernels, 8-bit output grids."""
    if weight_format != "int8" or float_outputs:
        raise ValueError(f"a model in deploy form exports as it computes (int8 codes, its own output grids); "
                         f"weight_format={weight_format!r}, float_outputs={float_outputs} would write float layers")


def ort_session(path: str | os.PathLike, *, optimize: bool = True, threads: int = 1, optimized_path: str | None = None) -> Any:
    """An ONNX Runtime CPU session with default options, except ``threads`` and, with
    ``optimize=False``, graph optimizations off (the QDQ graph runs as written)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the NCHWc warning when the optimized graph is saved
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(path: str | os.PathLike, x: Tensor, *, optimize: bool = True) -> Tensor | tuple[Tensor, ...]:
    """Run the exported model on CPU in ONNX Runtime's default session (what users run).

    ``optimize=False`` disables graph optimizations, so the QDQ nodes execute as written.
    Returns the one output, or a tuple when the model has several.
    """
    outs = ort_session(path, optimize=optimize).run(None, {"input": x.detach().cpu().numpy()})
    tensors = tuple(torch.from_numpy(o) for o in outs)
    return tensors[0] if len(tensors) == 1 else tensors


def op_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each op type the graph has (QDQ nodes are visible here)."""
    import onnx

    return dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node))


def optimized_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime's default session actually runs (its optimized model):
    ``QLinearConv`` / ``QGemm`` are integer kernels, ``Conv`` / ``FusedConv`` float ones."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = str(Path(tmp) / "optimized.onnx")
        ort_session(path, optimized_path=optimized)
        return op_counts(optimized)


def kernel_summary(counts: dict[str, int]) -> dict[str, int]:
    """``integer`` / ``float`` conv and matmul kernels among :func:`optimized_op_counts`."""
    return {"integer": sum(counts.get(k, 0) for k in INTEGER_OPS), "float": sum(counts.get(k, 0) for k in FLOAT_LAYER_OPS)}
