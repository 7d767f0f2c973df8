"""Integer-weight layers: what a quantized conv/linear becomes after export folding.

A layer holds its integer codes ``Z`` (an int8 buffer; int16 only for 8-bit odd codes
``2k - 255``, which reach ±255), the per-output-channel step ``s``
with ``Z * s`` equal to the fake-quantized weight, and the layer's input quantizer if it has
one (``QuantConfig.quant_inputs``), applied first. It computes ``conv(x, Z)`` and

* ``folded_into is None``: keeps ``s`` as an output scale, ``y = s * conv(x, Z) + c``;
* ``folded_into == "<bn name>"``: ``s`` lives in that BatchNorm (docs/methods.md#group-quantization), the layer
  returns ``conv(x, Z) + c / s`` and ``step`` is kept for reference only.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..quant import QuantConv2d, QuantLinear


def code_dtype(codes: Tensor) -> torch.dtype:
    """Smallest signed container for ``codes``: int8, else int16 (8-bit odd codes)."""
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    return torch.int8 if -128 <= lo and hi <= 127 else torch.int16


class _IntegerLayer(nn.Module):
    """Shared state of the integer layers: codes, step, bias and export metadata."""

    codes: Tensor
    step: Tensor
    bias: Tensor | None

    def _init_state(self, layer: QuantConv2d | QuantLinear, name: str) -> None:
        wq = layer.weight_quantizer
        codes, step = wq.to_integer(layer.weight.detach())
        self.register_buffer("codes", codes.to(code_dtype(codes)))
        self.register_buffer("step", step.detach().float().clone())
        bias = None if layer.bias is None else layer.bias.detach().clone()
        self.register_buffer("bias", bias)
        self.input_quantizer = copy.deepcopy(layer.input_quantizer)
        self.layer_name = name
        self.method = wq.method
        self.bits = wq.bits
        self.groups_used = wq.n_groups
        self.encoding = wq.code_encoding  # "odd" codes 2k - n are stored as k (see .integer)
        self.folded_into: str | None = None

    def _finish(self, y: Tensor, channel_shape: tuple[int, ...]) -> Tensor:
        if self.folded_into is None:
            y = y * self.step.reshape(channel_shape)
        if self.bias is not None:
            y = y + self.bias.reshape(channel_shape)
        return y

    def meta(self) -> dict[str, Any]:
        """Plain-Python metadata (JSON and ``weights_only`` safe)."""
        return {
            "kind": type(self).__name__, "method": self.method.value, "bits": self.bits,
            "groups": self.groups_used, "encoding": self.encoding, "folded_into": self.folded_into,
            "shape": list(self.codes.shape), "dtype": str(self.codes.dtype).replace("torch.", ""),
        }

    def extra_repr(self) -> str:
        return (
            f"method={self.method.value}, bits={self.bits}, groups={self.groups_used}, folded_into={self.folded_into}"
        )


class IntegerConv2d(_IntegerLayer):
    """``QuantConv2d`` after export: integer codes, step, optional folded BatchNorm."""

    def __init__(self, conv: QuantConv2d, name: str = "") -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"layer '{name}': export supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        self._init_state(conv, name)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.conv_groups = conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = F.conv2d(x, self.codes.to(x.dtype), None, self.stride, self.padding, self.dilation, self.conv_groups)
        return self._finish(y, (1, -1, 1, 1))


class IntegerLinear(_IntegerLayer):
    """``QuantLinear`` after export; never folded (no BatchNorm pairing for linears)."""

    def __init__(self, linear: QuantLinear, name: str = "") -> None:
        super().__init__()
        self._init_state(linear, name)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._finish(F.linear(x, self.codes.to(x.dtype)), (-1,))


INTEGER_LAYER_TYPES = (IntegerConv2d, IntegerLinear)
