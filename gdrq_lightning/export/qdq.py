"""The export form of a folded model: modules whose ONNX graph is QDQ (SPEC §8).

Every quantized conv/linear becomes a :class:`QDQWeightLayer` with ``DequantizeLinear``
weights (its BatchNorm folded into the per-channel scale and the bias; a negative BN factor
flips the symmetric codes instead of the scale's sign) and every activation quantizer a
:class:`QDQAct`. :func:`~.wiring.wire` then decides, from one pass over example data, which
layers become integer kernels in ONNX Runtime: those that read a per-tensor quantized
activation get the form ORT and TensorRT fuse,

    ``DequantizeLinear(x), DequantizeLinear(w), DequantizeLinear(bias int32, s_x · s_w) -> Conv -> QuantizeLinear``,

where the ``QuantizeLinear`` is the next activation quantizer's or, for an output that the
fake-quant model keeps in float (a residual branch before its add, an FPN output), an 8-bit
grid calibrated on the example data: the one approximation of the integer form. The others
stay float and exact (bias as a separate ``Add``, which ORT leaves alone).

b-bit weight codes (b < 8) are stored times ``m = 2**k`` in their int8 container (scale
``/ m``, the same weights): the int32 bias then sits on a lattice ``m`` times finer, so its
rounding moves results ``m`` times less often. With ``weight_format="int4"``, codes that fit
INT4 stay unscaled and are written as INT4 (:mod:`.onnx_export`); ONNX Runtime runs those
convs in float, exactly, from a file about half the size.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..quant import ActGrid, QuantReLU, QuantReLU6
from ..quant.inputs import InputQuantizer
from .fold import set_module
from .layers import INTEGER_LAYER_TYPES, IntegerConv2d
from .qdq_ops import DequantBias, DequantWeight, QuantizeGrid

WEIGHT_FORMATS = ("int8", "int4")
INT4_RANGE = (-8, 7)


class QDQAct(nn.Module):
    """``scale · clamp(round(x / scale), qmin, qmax)`` (``x <= 0 -> 0`` with ``zero_nonpositive``)
    in ``QuantizeLinear -> Clip -> DequantizeLinear`` form on a uint8 container with zero
    point ``zero`` (default: 0 for grids from 0 up, 128 for signed ones)."""

    def __init__(self, grid: ActGrid, meta: dict[str, Any], zero: int | None = None) -> None:
        super().__init__()
        self.zero = (0 if grid.qmin >= 0 else 128) if zero is None else zero
        if not (-self.zero <= grid.qmin <= grid.qmax <= 255 - self.zero):
            raise ValueError(f"grid [{grid.qmin}, {grid.qmax}] does not fit uint8 with zero point {self.zero}")
        self.register_buffer("scale", grid.scale.detach().float().clone())
        self.qmin, self.qmax, self.zero_nonpositive, self.meta = grid.qmin, grid.qmax, grid.zero_nonpositive, meta
        # a float Clip in front (per-tensor grids): ORT moves a QuantizeLinear up through a max pool
        # into a slow uint8 NCHW pool; a Clip it cannot move through keeps the pool in float
        self.guard = False

    @property
    def integer(self) -> bool:
        """Whether a conv reading this grid can be an integer kernel (per-tensor, a plain grid)."""
        return self.scale.dim() == 0 and not self.zero_nonpositive

    def forward(self, x: Tensor) -> Tensor:
        guard = None
        if self.guard:
            s = float(self.scale)
            guard = ((self.qmin - 0.49) * s, (self.qmax + 0.49) * s)
        return QuantizeGrid.apply(x, self.scale, self.zero, self.qmin, self.qmax, self.zero_nonpositive, guard)

    def extra_repr(self) -> str:
        return f"qmin={self.qmin}, qmax={self.qmax}, zero={self.zero}, zero_nonpositive={self.zero_nonpositive}"


def output_grid(lo: float, hi: float) -> tuple[ActGrid, int]:
    """The uint8 grid (and zero point) spanning ``[min(lo, 0), max(hi, 0)]``: a float output made integer."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255
    zero = int(min(max(round(-lo / scale), 0), 255))
    return ActGrid(torch.tensor(scale), -zero, 255 - zero), zero


def code_multiplier(codes: Tensor) -> int:
    """The largest power of two ``m`` with ``m · |codes| <= 127``."""
    peak = int(codes.abs().max()) if codes.numel() else 0
    return 1 << max(int(math.floor(math.log2(127 / peak))), 0) if peak else 1


class QDQWeightLayer(nn.Module):
    """A conv/linear in export form: ``DequantizeLinear`` weights (int8, or uint8 minus ``offset``
    for 8-bit odd codes), folded bias, optional input grid (the layer's input quantizer) and,
    once :meth:`make_integer` ran, an int32 bias and possibly an 8-bit output grid."""

    def __init__(self, codes: Tensor, scale: Tensor, offset: Tensor | None, bias: Tensor | None, int4: bool) -> None:
        super().__init__()
        self.int4 = int4
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)  # pre-shaped to broadcast against the weight
        self.register_buffer("bias", bias)
        self.register_buffer("bias_codes", None)
        self.register_buffer("bias_scale", None)
        self.register_buffer("float_weight", None)  # see :meth:`keep_float`
        self.input_act: nn.Module | None = None  # a QDQAct, or an input quantizer still in its clip phase
        self.output_act: QDQAct | None = None
        self.integer = False
        self.note = "not wired"

    @property
    def integer_weights(self) -> bool:
        """int8 codes without offset: what an integer kernel takes (INT4 ones ORT runs in float)."""
        return self.offset is None and not self.int4

    def weight(self) -> Tensor:
        if self.float_weight is not None:
            return self.float_weight
        w = DequantWeight.apply(self.codes, self.scale)
        return w if self.offset is None else w - self.offset

    @torch.no_grad()
    def keep_float(self, note: str) -> None:
        """Stay a float layer (bias added on its own). A linear layer's weight becomes a float
        initializer: ORT turns ``DequantizeLinear -> MatMul`` on a float input into ``MatMulNBits``,
        which quantizes the input to int8 (0.5% off on a 256-input layer); a conv it leaves alone."""
        self.note = note
        if isinstance(self, QDQLinear):
            self.float_weight = self.weight().clone()

    @torch.no_grad()
    def make_integer(self, in_scale: Tensor, exact_bias: Tensor | None) -> None:
        """Bias as int32 codes on the lattice ``in_scale · scale``, rounded from ``exact_bias``
        (float64), the value the fake-quant model adds."""
        self.integer, self.note = True, "integer"
        if exact_bias is None:
            return
        lattice = in_scale.to(self.scale.dtype) * self.scale
        codes = torch.round(exact_bias.double() / lattice.double())
        if codes.abs().max() >= 2**31:
            raise ValueError(f"bias does not fit int32 on the lattice s_x * s_w (min step {float(lattice.min()):.3g})")
        self.bias_codes, self.bias_scale = codes.to(torch.int32), lattice

    def _bias(self) -> Tensor | None:
        return self.bias if self.bias_codes is None else DequantBias.apply(self.bias_codes, self.bias_scale)

    def _layer(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.input_act is not None:
            x = self.input_act(x)
        if self.integer:
            y = self._layer(x, self.weight(), self._bias())
        else:  # float layers add the bias on their own: ORT would requantize a Conv's float bias
            y = self._layer(x, self.weight(), None)
            if self.bias is not None:
                y = y + self.bias.reshape([-1 if d == 1 else 1 for d in range(y.dim())] if y.dim() > 2 else [-1])
        return y if self.output_act is None else self.output_act(y)


class QDQConv2d(QDQWeightLayer):
    """A conv in export form (see :class:`QDQWeightLayer`)."""

    def __init__(self, layer: IntegerConv2d, *state: Any) -> None:
        super().__init__(*state)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.groups = layer.conv_groups

    def _layer(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class QDQLinear(QDQWeightLayer):
    """A linear layer in export form (no BN folding)."""

    def __init__(self, layer: nn.Module, *state: Any) -> None:
        super().__init__(*state)

    def _layer(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, w, bias)


def act_meta(q: nn.Module) -> dict[str, Any]:
    inner = q.magnitude if isinstance(q, InputQuantizer) else q
    return {"method": inner.method.value, "bits": q.bits, "groups": inner.act_groups, "input": isinstance(q, InputQuantizer)}


@torch.no_grad()
def _qdq_weight(layer: nn.Module, bn: nn.Module | None, weight_format: str) -> tuple[Any, ...]:
    """Codes, positive scale, offset, folded bias (float64) and INT4 flag of ``layer`` (+ ``bn``)."""
    z = layer.codes.to(torch.int32)
    bias = None if layer.bias is None else layer.bias.double()
    if bn is None:
        factor = layer.step.double()
    else:
        factor = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        c = torch.zeros_like(factor) if bias is None else bias
        bias = bn.bias.double() + (c - bn.running_mean.double()) * factor
    z = z * torch.where(factor < 0, -1, 1).to(torch.int32).reshape((-1,) + (1,) * (z.dim() - 1))
    factor = factor.abs()
    if weight_format == "int4" and INT4_RANGE[0] <= int(z.min()) and int(z.max()) <= INT4_RANGE[1]:
        return z.to(torch.int8), factor, None, bias, True
    if -128 <= int(z.min()) and int(z.max()) <= 127:
        m = code_multiplier(z)
        return (z * m).to(torch.int8), factor / m, None, bias, False
    n = 2**layer.bits - 1  # odd 8-bit codes 2k - 255 -> uint8 k, w = k * 2f - 255 f
    offset = (n * factor).reshape((-1,) + (1,) * (z.dim() - 1))
    return ((z + n) // 2).to(torch.uint8), 2 * factor, offset, bias, False


def _float_parts(state: tuple[Any, ...], dtype: torch.dtype) -> tuple[Any, ...]:
    codes, scale, offset, bias, int4 = state
    return codes, scale.to(dtype), None if offset is None else offset.to(dtype), None if bias is None else bias.to(dtype), int4


def act_channels(model: nn.Module, example_input: Tensor) -> dict[str, int]:
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
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


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
    from .wiring import as_args, wire

    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format={weight_format!r} is not one of: {', '.join(WEIGHT_FORMATS)}")
    channels = act_channels(folded, *as_args(example_input))
    qdq = copy.deepcopy(folded).eval()
    exact_bias: dict[str, Tensor | None] = {}
    for name, layer in list(qdq.named_modules()):
        if isinstance(layer, INTEGER_LAYER_TYPES):
            bn = qdq.get_submodule(layer.folded_into) if layer.folded_into else None
            state = _qdq_weight(layer, bn, weight_format)
            exact_bias[name] = state[3]
            new = (QDQConv2d if isinstance(layer, IntegerConv2d) else QDQLinear)(layer, *_float_parts(state, dtype))
            iq = layer.input_quantizer
            if iq is not None and iq.is_on():
                new.input_act = QDQAct(iq.export_grid(channels.get(f"{name}.input_quantizer")), act_meta(iq))
            elif iq is not None:
                new.input_act = iq  # its clip phase without quantization: kept as it is
            set_module(qdq, name, new)
            if layer.folded_into:
                set_module(qdq, layer.folded_into, nn.Identity())
        elif isinstance(layer, (QuantReLU, QuantReLU6)) and layer.act_quantizer.is_on("quant_on"):
            q = layer.act_quantizer
            set_module(qdq, name, QDQAct(q.export_grid(channels.get(name)), act_meta(q)))
    qdq = qdq.to(dtype)
    wire(qdq, [example_input] if calibration is None else calibration, exact_bias, dtype, float_outputs)
    return qdq
