"""The export form of a folded model: modules whose ONNX graph is QDQ (docs/methods.md#export).

Every quantized conv/linear becomes a :class:`QDQWeightLayer` with ``DequantizeLinear``
weights (its BatchNorm folded into the per-channel scale and the bias; a negative BN factor
flips the symmetric codes instead of the scale's sign) and every activation quantizer a
:class:`QDQAct`. :func:`~.build.build_qdq_model` builds them and :func:`~.wiring.wire` decides, from one pass over example data, which
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

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..quant import ActGrid
from .layers import IntegerConv2d
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
        self.wired: tuple[Any, Any] | None = None  # (input grid, direct output quantizers), see wiring

    @property
    def integer_weights(self) -> bool:
        """int8 codes without offset: what an integer kernel takes (INT4 ones ORT runs in float)."""
        return self.offset is None and not self.int4

    def weight(self) -> Tensor:
        if self.float_weight is not None:
            return self.float_weight
        w = DequantWeight.apply(self.codes, self.scale, self.integer and isinstance(self, QDQLinear))
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

    def __init__(self, layer: nn.Module, *state: Any) -> None:
        super().__init__(*state)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.groups = layer.conv_groups if isinstance(layer, IntegerConv2d) else layer.groups  # or a QuantConv2d

    def _layer(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class QDQLinear(QDQWeightLayer):
    """A linear layer in export form (no BN folding)."""

    def __init__(self, layer: nn.Module, *state: Any) -> None:
        super().__init__(*state)

    def _layer(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, w, bias)
