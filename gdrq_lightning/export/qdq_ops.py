"""The export-form ops: ``torch.autograd.Function``s whose ``symbolic`` writes ONNX
``QuantizeLinear`` / ``Clip`` / ``DequantizeLinear`` (docs/methods.md#export).

torch's TorchScript exporter maps ``fake_quantize_*`` only with 8-bit ranges, so these ops
carry their own ONNX form. Each ``forward`` computes what its ONNX form computes (``x / s``,
not ``x * (1/s)``; per-channel ``axis``), so PyTorch is a reference for ONNX Runtime.

* :class:`DequantWeight`: constant int8 codes (uint8 for 8-bit odd codes) ->
  ``DequantizeLinear(axis=0)``, zero point 0, left out (the file is that much smaller) except
  for an integer linear layer: ONNX Runtime fuses ``DequantizeLinear -> Gemm`` into ``QGemm``
  only with the weights' zero point given (a conv into ``QLinearConv`` either way).
* :class:`DequantBias`: a conv/linear bias as int32 codes on the lattice ``s_x · s_w`` ->
  ``DequantizeLinear(axis=0)``: the form ONNX Runtime and TensorRT fuse into an integer
  kernel (a float bias makes ORT quantize it itself, differently).
* :class:`QuantizeGrid`: ``s · clamp(round(x / s), q_min, q_max)`` as ``QuantizeLinear``
  (uint8, zero point ``z``) -> ``Clip(z + q_min, z + q_max)`` -> ``DequantizeLinear``; the
  Clip is left out where the uint8 range itself is the grid. A ReLU grid has ``z = 0`` (the
  container's saturation at 0 *is* the ReLU, so ORT drops a Relu before it), a signed grid
  ``z = 128``; ``zero_nonpositive`` (HWGQ) adds ``Where(x > 0, ., 0)``; a ``guard`` adds a float
  ``Clip`` to ``[(q_min - 0.49) s, (q_max + 0.49) s]`` before, which changes no result.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _axis_shape(t: Tensor, x: Tensor, axis: int) -> Tensor:
    return t.reshape([-1 if d == axis else 1 for d in range(x.dim())]) if t.dim() else t


class DequantWeight(torch.autograd.Function):
    """``codes * scale`` per output channel: a constant ``DequantizeLinear(axis=0)`` in ONNX."""

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor, zero_point: bool = False) -> Tensor:  # type: ignore[override]
        return codes.to(scale.dtype) * _axis_shape(scale, codes, 0)

    @staticmethod
    def symbolic(g, codes, scale, zero_point: bool = False):  # type: ignore[no-untyped-def]
        if not zero_point:
            return g.op("DequantizeLinear", codes, scale, axis_i=0)  # no zero point input: 0
        zp = g.op("Constant", value_t=torch.zeros(scale.type().sizes(), dtype=torch.int8))
        return g.op("DequantizeLinear", codes, scale, zp, axis_i=0)


class DequantBias(torch.autograd.Function):
    """``codes * scale`` of an int32 bias with the per-channel scale ``s_x · s_w``."""

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        return codes.to(scale.dtype) * scale

    @staticmethod
    def symbolic(g, codes, scale):  # type: ignore[no-untyped-def]
        return g.op("DequantizeLinear", codes, scale, axis_i=0)


class QuantizeGrid(torch.autograd.Function):
    """``s * clamp(round(x / s), q_min, q_max)`` on a uint8 container with zero point ``z``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, scale: Tensor, zero: int, qmin: int, qmax: int, zero_nonpositive: bool,
        guard: tuple[float, float] | None = None,
    ) -> Tensor:
        if guard is not None:
            x = torch.clamp(x, *guard)
        s = _axis_shape(scale, x, 1)
        y = torch.clamp(torch.round(x / s), qmin, qmax) * s
        return torch.where(x > 0, y, torch.zeros_like(y)) if zero_nonpositive else y

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, x, scale, zero: int, qmin: int, qmax: int, zero_nonpositive: bool, guard: tuple[float, float] | None = None
    ):
        sizes = scale.type().sizes()
        zp = g.op("Constant", value_t=torch.full(sizes, zero, dtype=torch.uint8))
        axis = {"axis_i": 1} if len(sizes) == 1 else {}
        if guard is not None:  # a float Clip inside the grid's rounding range: same result, see QDQAct.guard
            lo, hi = (g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32)) for v in guard)
            x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zp, **axis)
        if zero + qmin > 0 or zero + qmax < 255:
            lo = g.op("Constant", value_t=torch.tensor(zero + qmin, dtype=torch.uint8))
            hi = g.op("Constant", value_t=torch.tensor(zero + qmax, dtype=torch.uint8))
            q = g.op("Clip", q, lo, hi)
        y = g.op("DequantizeLinear", q, scale, zp, **axis)
        if not zero_nonpositive:
            return y
        positive = g.op("Greater", x, g.op("Constant", value_t=torch.tensor(0.0)))
        return g.op("Where", positive, y, g.op("Constant", value_t=torch.tensor(0.0)))
