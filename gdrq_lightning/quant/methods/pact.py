"""PACT (docs/methods.md#baselines), the worked example of a method module.

A method module holds everything the library asks of the method: its math (``pact_act``),
its quantizer classes (weights: DoReFa's, reused; activations: a learnable clip ``alpha``),
the integer grid export writes (``export_grid``), the clip monitoring logs (``clip_value``),
the check of its own options (``pact_alpha_init``, ``pact_decay``) and one ``register`` call,
which also names the input quantizer's magnitude rule (``input=``): the same learnable clip,
mirrored to a signed grid ``clamp(x, -alpha, alpha)`` (:mod:`..inputs`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels as K
from .. import ops as O
from .. import primitives as P
from ..config import Method, QuantConfig
from ..kernels import MIN_SCALE
from ..quantizers import ActGrid, ActQuantizer
from ..registry import register
from .dorefa import DoReFaWeightQuantizer


class _L2Grad(torch.autograd.Function):
    """Identity forward; backward adds ``decay * alpha`` (L2 decay on PACT's alpha)."""

    @staticmethod
    def forward(ctx, alpha: Tensor, decay: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(alpha)
        ctx.decay = decay
        return alpha.view_as(alpha)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (alpha,) = ctx.saved_tensors
        return grad + ctx.decay * alpha, None


def pact_act(x: Tensor, alpha: Tensor, bits: int, decay: float = 0.0) -> Tensor:
    """PACT: ``y = clamp(x, 0, alpha)`` quantized to ``bits`` with a learnable ``alpha``.

    Gradients follow the PACT paper: ``dy/dx = 1`` on ``[0, alpha)``, ``dy/dalpha = 1``
    where ``x >= alpha``; the rounding is straight-through. ``decay`` adds the L2
    term ``decay * alpha`` to alpha's gradient once per call.
    """
    if decay:
        alpha = _L2Grad.apply(alpha, decay)
    n = P.unsigned_levels(bits)
    if K.fast_ok(x) and alpha.numel() == 1 and alpha.dtype == x.dtype:  # the same math as one op
        return O.learned_clip_fake_quant(x, alpha, n, torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad))[0]
    # ``where`` rather than ``minimum``: at ``x == alpha`` the gradient goes to alpha, not half/half
    y = torch.where(x >= alpha, alpha, torch.relu(x))
    s = (alpha.detach() / n).clamp_min(MIN_SCALE)
    return y + (torch.round(y.detach() / s) * s - y.detach())


class PACTActQuantizer(ActQuantizer):
    """``clamp(x, 0, alpha)`` quantized, ``alpha`` learned (initialised to ``pact_alpha_init``)."""

    def __init__(self, cfg: QuantConfig, upper: float | None = None, layer_name: str = "") -> None:
        super().__init__(cfg, upper, layer_name)
        self.alpha = nn.Parameter(torch.tensor([float(cfg.pact_alpha_init)]))
        self.decay = cfg.pact_decay

    def forward(self, x: Tensor) -> Tensor:
        if not self._on["quant_on"]:
            return P.attach(self.act(x), self.alpha)
        return pact_act(x, self.alpha.to(x.dtype), self.bits, self.decay)  # keeps bf16/fp16 outputs in their dtype

    def clip_value(self) -> Tensor | None:
        return self.alpha.detach().reshape(())

    def export_grid(self, channels: int | None) -> ActGrid:
        n = P.unsigned_levels(self.bits)
        return ActGrid((self.alpha.detach().float() / n).clamp_min(MIN_SCALE).reshape(()), 0, n)


def _validate(cfg: QuantConfig, where: str) -> None:
    value = cfg.pact_alpha_init
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{where}QuantConfig.pact_alpha_init={value!r} must be a number > 0")
    if not isinstance(cfg.pact_decay, (int, float)) or cfg.pact_decay < 0:
        raise ValueError(f"{where}QuantConfig.pact_decay={cfg.pact_decay!r} must be >= 0")


register(Method.pact, weight=DoReFaWeightQuantizer, act=PACTActQuantizer, validate=_validate, input=PACTActQuantizer)
