"""DoReFa (docs/methods.md#baselines): weights ``2 · q_u(tanh(w) / (2 max|tanh w|) + 1/2) - 1``, activations
``q_u(clamp(x, 0, 1))``. Weight codes are odd/even ``2k - n`` (levels ``(2k - n) / n``).

A layer with no BatchNorm after it (an FPN conv, a head, a quantized last linear) also multiplies
its weights by ``w_scale = mean|W| / mean|Q(W)|``, fixed at its first quantized forward: without a
BatchNorm to absorb it, the jump from the float weights' scale to ``[-1, 1]`` reaches the output.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import primitives as P
from ..config import Method
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
    """DoReFa's ``tanh`` weights (binary ``mean|w| · sign(w)`` at 1 bit), times ``w_scale``.

    ``w_scale`` is a buffer: 1 for a layer followed by BatchNorm (the paper's form); for one without,
    the swap calls :meth:`rescale_without_batchnorm` and the first quantized forward fixes it (0 until
    then). Checkpoints keep it, so a resumed run goes on with the same constant.
    """

    rescales_without_batchnorm = True  # asks the swap which layers have no BatchNorm after them

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.register_buffer("w_scale", torch.tensor(1.0))
        self.rescale = False  # no BatchNorm after this layer (set by the swap)
        self._w_scale_pending = False  # mirrors ``w_scale == 0`` without a device sync per forward

    @property
    def code_encoding(self) -> str:
        return "odd"

    def rescale_without_batchnorm(self) -> None:
        """This layer's output reaches the network unnormalised: keep its weights' magnitude."""
        self.rescale = True
        self._fix_at_next_forward()

    def _fix_at_next_forward(self) -> None:
        self.w_scale.zero_()
        self._w_scale_pending = True

    def set_bits(self, bits: int, weight: Tensor, *, reinit: bool) -> None:
        """A new width changes ``mean|Q(W)|``: with ``reinit``, ``w_scale`` is fixed again."""
        self.bits = bits
        if reinit and self.rescale:
            self._fix_at_next_forward()

    def _levels(self, w: Tensor) -> Tensor:
        q = P.binarize(w, 1) if self.bits == 1 else dorefa_weight(w, self.bits)
        if self._w_scale_pending:
            with torch.no_grad():
                self.w_scale.copy_(w.abs().mean() / q.abs().mean().clamp_min(MIN_SCALE))
            self._w_scale_pending = False
        return q

    def forward(self, w: Tensor) -> Tensor:
        if not self._on["quant_on"]:
            return w
        q = self._levels(w)
        return q * self.w_scale.to(q.dtype) if self.rescale else q

    @torch.no_grad()
    def to_integer(self, w: Tensor) -> tuple[Tensor, Tensor]:
        if self.bits == 1:
            return P.binary_codes(self.forward(w))
        n = P.unsigned_levels(self.bits)
        codes = torch.round(self._levels(w) * n).to(torch.int32)
        return codes, (self.w_scale.float() / n).expand(w.shape[0]).to(w.device).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if prefix + "w_scale" not in state_dict:
            if prefix + "quant_on" in state_dict:  # a quantized checkpoint from before w_scale: its meaning
                state_dict[prefix + "w_scale"] = torch.ones((), device=self.w_scale.device)
                self.rescale = False
            else:  # float weights loaded into a swapped model: w_scale is still to be fixed
                state_dict[prefix + "w_scale"] = self.w_scale.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._w_scale_pending = self.rescale and bool(self.w_scale == 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", w_scale" if self.rescale else "")


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
