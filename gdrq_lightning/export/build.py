"""Build the export form of a folded model: each quantized conv/linear a
:class:`~.qdq.QDQWeightLayer` (BatchNorm folded into its per-channel scale and bias), each
activation quantizer a :class:`~.qdq.QDQAct`, then :func:`~.wiring.wire` decides which layers
become integer kernels. Kept apart from :mod:`.qdq` (the modules) and :mod:`.wiring` (the
decision), which both stand without this step.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..quant import QuantReLU, QuantReLU6
from ..quant.inputs import InputQuantizer
from ..utils.modules import set_submodule
from .layers import INTEGER_LAYER_TYPES, IntegerConv2d
from .qdq import INT4_RANGE, WEIGHT_FORMATS, QDQAct, QDQConv2d, QDQLinear, code_multiplier
from .wiring import as_args, wire


def act_meta(q: nn.Module) -> dict[str, Any]:
    inner = q.magnitude if isinstance(q, InputQuantizer) else q
    return {"method": inner.method.value, "bits": q.bits, "groups": inner.act_groups, "input": isinstance(q, InputQuantizer)}


@torch.no_grad()
def _qdq_weight(layer: nn.Module, bn: nn.Module | None, weight_format: str) -> tuple[Any, ...]:
    """Codes, positive scale, offset, folded bias (float64) and INT4 flag of ``layer`` (+ ``bn``)."""
    bias = None if layer.bias is None else layer.bias.double()
    if bn is None:
        factor = layer.step.double()
    else:
        factor = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        c = torch.zeros_like(factor) if bias is None else bias
        bias = bn.bias.double() + (c - bn.running_mean.double()) * factor
    return qdq_weight(layer.codes.to(torch.int32), factor, bias, layer.bits, weight_format)


@torch.no_grad()
def qdq_weight(z: Tensor, factor: Tensor, bias: Tensor | None, bits: int, weight_format: str) -> tuple[Any, ...]:
    """Export parts of integer codes ``z`` times a per-channel ``factor`` (float64; a negative one
    flips the channel's codes) plus ``bias``: codes, positive scale, offset, bias, INT4 flag."""
    z = z * torch.where(factor < 0, -1, 1).to(torch.int32).reshape((-1,) + (1,) * (z.dim() - 1))
    factor = factor.abs()
    if weight_format == "int4" and INT4_RANGE[0] <= int(z.min()) and int(z.max()) <= INT4_RANGE[1]:
        return z.to(torch.int8), factor, None, bias, True
    if -128 <= int(z.min()) and int(z.max()) <= 127:
        m = code_multiplier(z)
        return (z * m).to(torch.int8), factor / m, None, bias, False
    n = 2**bits - 1  # odd 8-bit codes 2k - 255 -> uint8 k, w = k * 2f - 255 f
    offset = (n * factor).reshape((-1,) + (1,) * (z.dim() - 1))
    return ((z + n) // 2).to(torch.uint8), 2 * factor, offset, bias, False


def float_parts(state: tuple[Any, ...], dtype: torch.dtype) -> tuple[Any, ...]:
    codes, scale, offset, bias, int4 = state
    return codes, scale.to(dtype), None if offset is None else offset.to(dtype), None if bias is None else bias.to(dtype), int4


def act_channels(model: nn.Module, *args: Any) -> dict[str, int]:
    """Input channel count of every activation / input quantizer, from one eval forward pass."""
    seen: dict[str, int] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen.setdefault(name, args[0].shape[1] if args[0].dim() > 1 else 1)

        return hook

    kinds = (QuantReLU, QuantReLU6, InputQuantizer)
    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model.eval()(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def no_inplace(model: nn.Module) -> nn.Module:
    """Switch off ``inplace`` of the float activations left in an export-form copy: the TorchScript
    exporter loses the shape of an in-place op's result on a QDQ op's output (a Faster R-CNN's
    RPN head ReLU after its quantized conv then made the RoI pooler's ``nonzero`` indices rank 3)."""
    for module in model.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            module.inplace = False
    return model


def build_qdq_model(
    folded: nn.Module,
    example_input: Any,
    dtype: torch.dtype = torch.float32,
    *,
    weight_format: str = "int8",
    calibration: list[Any] | None = None,
    float_outputs: bool = False,
) -> nn.Module:
    """A copy of a folded model in export form, wired for integer kernels (module docstring).

    Args:
        folded: a :func:`~.fold.fold_groups_into_bn` result.
        example_input: one input (a batch tensor, or a tuple of model arguments).
        dtype: precision of scales and biases: float32 for ONNX; float64 lets a test compare
            the graph with the fake-quant model free of float rounding.
        weight_format: ``"int8"`` (integer kernels) or ``"int4"`` (INT4 weights where they fit).
        calibration: inputs whose outputs set the 8-bit grids of float outputs made integer
            (default: ``[example_input]``).
        float_outputs: keep layers whose output no quantizer reads (residual branches, FPN
            outputs) float instead of giving them an 8-bit output grid: exact, fewer integer kernels.

    Raises:
        ValueError: unknown ``weight_format``.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format={weight_format!r} is not one of: {', '.join(WEIGHT_FORMATS)}")
    channels = act_channels(folded, *as_args(example_input))
    qdq = no_inplace(copy.deepcopy(folded).eval())
    exact_bias: dict[str, Tensor | None] = {}
    for name, layer in list(qdq.named_modules()):
        if isinstance(layer, INTEGER_LAYER_TYPES):
            bn = qdq.get_submodule(layer.folded_into) if layer.folded_into else None
            state = _qdq_weight(layer, bn, weight_format)
            exact_bias[name] = state[3]
            new = (QDQConv2d if isinstance(layer, IntegerConv2d) else QDQLinear)(layer, *float_parts(state, dtype))
            iq = layer.input_quantizer
            if iq is not None and iq.is_on():
                new.input_act = QDQAct(iq.export_grid(channels.get(f"{name}.input_quantizer")), act_meta(iq))
            elif iq is not None:
                new.input_act = iq  # its clip phase without quantization: kept as it is
            set_submodule(qdq, name, new)
            if layer.folded_into:
                set_submodule(qdq, layer.folded_into, nn.Identity())
        elif isinstance(layer, (QuantReLU, QuantReLU6)) and layer.act_quantizer.is_on("quant_on"):
            q = layer.act_quantizer
            set_submodule(qdq, name, QDQAct(q.export_grid(channels.get(name)), act_meta(q)))
    qdq = qdq.to(dtype)
    wire(qdq, [example_input] if calibration is None else calibration, exact_bias, dtype, float_outputs)
    return qdq
