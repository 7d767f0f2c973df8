"""DoReFa (docs/methods.md#baselines): weights ``2 · q_u(tanh(w) / (2 max|tanh w|) + 1/2) - 1``, activations
``q_u(clamp(x, 0, 1))``. Weight codes are odd/even ``2k - n`` (levels ``(2k - n) / n``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import primitives as P
from ..config import Method, QuantConfig
from ..kernels import MIN_SCALE
from ..quantizers import ActGrid, ActQuantizer, WeightQuantizer
from ..registry import register


def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa weights ``2 * q_u(tanh(w) / (2 max|tanh w|) + 1/2) - 1`` (``bits >= 2``).

    The gradient flows through ``tanh`` and the max normalisation, as in the paper;
    ``q_u`` rounds with an STE. Output levels are ``(2k - n) / n``, ``k = 0..n``.
    """
    n = P.unsigned_levels(bits)
    t = torch.tanh(w)
    t = t / (2 * t.abs().max().clamp_min(MIN_SCALE)) + 0.5
    return 2 * (P.round_ste(t * n) / n) - 1


def dorefa_act(x: Tensor, bits: int) -> Tensor:
    """DoReFa activations ``q_u(clamp(x, 0, 1))``."""
    n = P.unsigned_levels(bits)
    return P.round_ste(torch.clamp(x, 0.0, 1.0) * n) / n


class DoReFaWeightQuantizer(WeightQuantizer):
    """DoReFa's ``tanh`` weights (binary ``mean|w| · sign(w)`` at 1 bit)."""

    @property
    def code_encoding(self) -> str:
        return "odd"

    def forward(self, w: Tensor) -> Tensor:
        if not self._on["quant_on"]:
            return w
        return P.binarize(w, 1) if self.bits == 1 else dorefa_weight(w, self.bits)

    @torch.no_grad()
    def to_integer(self, w: Tensor) -> tuple[Tensor, Tensor]:
        if self.bits == 1:
            return P.binary_codes(self.forward(w))
        n = P.unsigned_levels(self.bits)
        codes = torch.round(self.forward(w) * n)
        return codes.to(torch.int32), torch.full((w.shape[0],), 1.0 / n, device=w.device)


class DoReFaActQuantizer(ActQuantizer):
    """``q_u(clamp(x, 0, 1))`` in place of the ReLU (quantization on)."""

    def forward(self, x: Tensor) -> Tensor:
        return dorefa_act(x, self.bits) if self._on["quant_on"] else self.act(x)

    def clip_value(self) -> Tensor | None:
        return torch.tensor(1.0)

    def export_grid(self, channels: int | None) -> ActGrid:
        n = P.unsigned_levels(self.bits)
        return ActGrid(torch.tensor(1.0 / n), 0, n)


register(Method.dorefa, weight=DoReFaWeightQuantizer, act=DoReFaActQuantizer, input=DoReFaActQuantizer)
