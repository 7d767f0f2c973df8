"""Export-mode modules whose ONNX form is QuantizeLinear / Clip / DequantizeLinear (SPEC §8).

torch's TorchScript exporter only maps ``fake_quantize_*`` with 8-bit ranges, so the
low-bit ops here are ``torch.autograd.Function``s with a ``symbolic``:

* weights: a constant int8 initializer -> ``DequantizeLinear`` per output channel
  (``axis=0``); the BatchNorm that followed the conv is folded into that scale and
  the conv bias. A negative BN factor flips the (symmetric) codes instead of the
  scale's sign. 8-bit odd codes ``2k - 255`` do not fit int8: they go out as
  uint8 ``k`` with scale ``2s`` followed by ``Sub(255 s)`` (a float per-channel offset).
* activations (QCDQ), from each quantizer's :class:`~gdrq_lightning.quant.ActGrid`:
  ``QuantizeLinear`` (uint8, zero point 0) -> ``Clip(q_min, q_max)`` -> ``DequantizeLinear``;
  the Clip is omitted at the full uint8 range. A grid with ``zero_nonpositive`` (HWGQ) adds
  ``Where(x > 0, ., 0)``, which with ``q_min = 1`` is that rule exactly: ``(0, D/2)`` maps to ``D``.

The PyTorch forward of each function computes the same formula (``x / s``, not
``x * (1/s)``), so ONNX Runtime agrees with it to float rounding.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..quant import ActQuantizer, QuantReLU, QuantReLU6
from .fold import set_module
from .layers import INTEGER_LAYER_TYPES, IntegerConv2d


class DequantWeight(torch.autograd.Function):
    """``codes * scale`` per output channel: a constant ``DequantizeLinear(axis=0)`` in ONNX."""

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor, unsigned: bool) -> Tensor:  # type: ignore[override]
        return codes.to(scale.dtype) * scale.reshape((-1,) + (1,) * (codes.dim() - 1))

    @staticmethod
    def symbolic(g, codes, scale, unsigned: bool):  # type: ignore[no-untyped-def]
        channels = scale.type().sizes()[0]
        zero = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.uint8 if unsigned else torch.int8))
        return g.op("DequantizeLinear", codes, scale, zero, axis_i=0)


class QuantizeAct(torch.autograd.Function):
    """``s * clamp(round(x / s), q_min, q_max)`` (uint8 grid); HWGQ keeps ``x <= 0`` at 0."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int, zero_nonpositive: bool) -> Tensor:  # type: ignore[override]
        s = scale.reshape((1, -1) + (1,) * (x.dim() - 2)) if scale.dim() else scale
        y = torch.clamp(torch.round(x / s), qmin, qmax) * s
        return torch.where(x > 0, y, torch.zeros_like(y)) if zero_nonpositive else y

    @staticmethod
    def symbolic(g, x, scale, qmin: int, qmax: int, zero_nonpositive: bool):  # type: ignore[no-untyped-def]
        sizes = scale.type().sizes()
        per_channel = len(sizes) == 1
        zero = g.op("Constant", value_t=torch.zeros(sizes, dtype=torch.uint8))
        axis = {"axis_i": 1} if per_channel else {}
        q = g.op("QuantizeLinear", x, scale, zero, **axis)
        if qmin > 0 or qmax < 255:
            lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=torch.uint8))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=torch.uint8))
            q = g.op("Clip", q, lo, hi)
        y = g.op("DequantizeLinear", q, scale, zero, **axis)
        if not zero_nonpositive:
            return y
        positive = g.op("Greater", x, g.op("Constant", value_t=torch.tensor(0.0)))
        return g.op("Where", positive, y, g.op("Constant", value_t=torch.tensor(0.0)))


class QDQWeightLayer(nn.Module):
    """Buffers of an export-form weight: codes (int8, or uint8 with ``offset``), scale, bias."""

    def __init__(self, codes: Tensor, scale: Tensor, offset: Tensor | None, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)  # pre-shaped to broadcast against the weight
        self.register_buffer("bias", bias)

    def weight(self) -> Tensor:
        w = DequantWeight.apply(self.codes, self.scale, self.offset is not None)
        return w if self.offset is None else w - self.offset


class QDQConv2d(QDQWeightLayer):
    """Conv whose weight is ``DequantizeLinear(codes)``, with its BN folded into scale and bias."""

    def __init__(self, layer: IntegerConv2d, *state: Tensor | None) -> None:
        super().__init__(*state)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.groups = layer.conv_groups

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class QDQLinear(QDQWeightLayer):
    """Linear layer with a ``DequantizeLinear`` weight (no BN folding)."""

    def __init__(self, layer: nn.Module, *state: Tensor | None) -> None:
        super().__init__(*state)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight(), self.bias)


class QDQAct(nn.Module):
    """An activation quantizer in QCDQ form; ``scale`` is 0-dim or per channel (axis 1)."""

    def __init__(self, scale: Tensor, qmin: int, qmax: int, zero_nonpositive: bool, meta: dict[str, Any]) -> None:
        super().__init__()
        self.register_buffer("scale", scale.float())
        self.qmin, self.qmax, self.zero_nonpositive, self.meta = qmin, qmax, zero_nonpositive, meta

    def forward(self, x: Tensor) -> Tensor:
        return QuantizeAct.apply(x, self.scale, self.qmin, self.qmax, self.zero_nonpositive)

    def extra_repr(self) -> str:
        return f"qmin={self.qmin}, qmax={self.qmax}, zero_nonpositive={self.zero_nonpositive}"


def act_qcdq(q: ActQuantizer, channels: int | None) -> QDQAct:
    """The QCDQ equivalent of an activation quantizer (quantization on, eval mode)."""
    grid = q.export_grid(channels)
    meta = {"method": q.method.value, "bits": q.bits, "groups": q.act_groups}
    return QDQAct(grid.scale, grid.qmin, grid.qmax, grid.zero_nonpositive, meta)


@torch.no_grad()
def _qdq_weight(
    layer: nn.Module, bn: nn.Module | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Codes, positive scale, offset, bias of ``layer`` (+ folded ``bn``), computed in float64, cast to ``dtype``."""
    z = layer.codes.to(torch.int32)
    bias = None if layer.bias is None else layer.bias.double()
    if bn is None:
        factor = layer.step.double()
    else:
        factor = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        c = torch.zeros_like(factor) if bias is None else bias
        bias = bn.bias.double() + (c - bn.running_mean.double()) * factor
    sign = torch.where(factor < 0, -1, 1).to(torch.int32)
    z = z * sign.reshape((-1,) + (1,) * (z.dim() - 1))
    factor = factor.abs()
    if -128 <= int(z.min()) and int(z.max()) <= 127:
        return z.to(torch.int8), factor.to(dtype), None, None if bias is None else bias.to(dtype)
    n = 2**layer.bits - 1  # odd 8-bit codes 2k - 255 -> uint8 k, w = k * 2f - 255 f
    offset = (n * factor).to(dtype).reshape((-1,) + (1,) * (z.dim() - 1))
    return ((z + n) // 2).to(torch.uint8), (2 * factor).to(dtype), offset, None if bias is None else bias.to(dtype)


def act_channels(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Input channel count of every quantized activation module, from one eval forward pass."""
    seen: dict[str, int] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen.setdefault(name, args[0].shape[1] if args[0].dim() > 1 else 1)

        return hook

    acts = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantReLU, QuantReLU6))]
    hooks = [m.register_forward_pre_hook(record(n)) for n, m in acts]
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


def build_qdq_model(folded: nn.Module, example_input: Tensor, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of a folded model in export form: QDQ weights (BN folded in) and QCDQ activations.

    ``dtype`` is the precision of the folded scales and biases: float32 for ONNX;
    float64 lets a test compare the whole graph with the fake-quant model free of float
    rounding (and so of activation levels flipping at rounding ties).
    """
    channels = act_channels(folded, example_input)
    qdq = copy.deepcopy(folded).eval()
    for name, layer in list(qdq.named_modules()):
        if isinstance(layer, INTEGER_LAYER_TYPES):
            bn = qdq.get_submodule(layer.folded_into) if layer.folded_into else None
            cls = QDQConv2d if isinstance(layer, IntegerConv2d) else QDQLinear
            set_module(qdq, name, cls(layer, *_qdq_weight(layer, bn, dtype)))
            if layer.folded_into:
                set_module(qdq, layer.folded_into, nn.Identity())
        elif isinstance(layer, (QuantReLU, QuantReLU6)) and layer.act_quantizer.is_on("quant_on"):
            set_module(qdq, name, act_qcdq(layer.act_quantizer, channels.get(name)))
    return qdq.to(dtype)
