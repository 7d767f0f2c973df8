"""HWGQ (docs/methods.md#hwgq): half-wave Gaussian quantizer for activations that follow a BatchNorm,
binary weights with one ``alpha = mean|w|`` per output filter.

Forward: ``0`` for ``x <= 0``, ``D * clamp(round(x / D), 1, 2**b - 1)`` above, with the
MSE-optimal step ``D_b`` for a unit Gaussian (found once by golden-section search). The
backward approximator is ``relu``, ``clipped`` (the paper's default) or ``log_tailed``.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import kernels as K
from .. import ops as O
from .. import primitives as P
from ..config import Method, QuantConfig
from ..kernels import fast_ok
from ..quantizers import ActGrid, ActQuantizer, WeightQuantizer
from ..registry import register
from .gdrq import ThresholdActQuantizer


def hwgq_forward(x: Tensor, step: float, bits: int) -> Tensor:
    """HWGQ forward: ``0`` for ``x <= 0``, else ``D * clamp(round(x / D), 1, 2**b - 1)``."""
    q = step * torch.clamp(torch.round(x / step), 1, P.unsigned_levels(bits))
    return torch.where(x > 0, q, torch.zeros_like(x))


class HWGQReference(torch.autograd.Function):
    """HWGQ keeping ``x`` for the backward: the ``log_tailed`` approximator (its gradient depends on
    ``x`` above ``q_max``) and dtypes the fused op skips."""

    @staticmethod
    def forward(ctx, x: Tensor, step: float, bits: int, backward: str) -> Tensor:  # type: ignore[override]
        ctx.q_max, ctx.mode = P.unsigned_levels(bits) * step, backward
        ctx.save_for_backward(x)
        return hwgq_forward(x, step, bits)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return _backward_reference(grad, x, ctx.mode, ctx.q_max), None, None, None


def _backward_reference(grad: Tensor, x: Tensor, mode: str, q_max: float) -> Tensor:
    pos = x > 0
    if mode == "relu":
        return grad * pos
    if mode == "clipped":
        return grad * (pos & (x <= q_max))
    tail = 1.0 / (x - q_max + 1.0).clamp_min(1.0)  # log_tailed
    return grad * torch.where(x <= q_max, pos.to(grad.dtype), tail)


def hwgq(x: Tensor, step: float, bits: int, backward: str = "clipped") -> Tensor:
    """Apply HWGQ with step ``D`` (see :func:`hwgq_optimal_step`): one fused op keeping a 1-byte
    mask for the ``relu`` and ``clipped`` backward approximators."""
    if backward == "log_tailed" or not fast_ok(x):
        return HWGQReference.apply(x, step, bits, backward)
    return O.hwgq(x, step, P.unsigned_levels(bits), backward == "clipped", K.needs_grad(x))[0]


def hwgq_mse(step: float, bits: int, points: int = 200_001, x_max: float = 12.0) -> float:
    """Mean squared error of the HWGQ rule for ``x ~ N(0, 1)`` restricted to ``x > 0``.

    Negative inputs map to 0 exactly, so the error on ``x > 0`` is what ``D`` controls.
    """
    xs = torch.linspace(0.0, x_max, points, dtype=torch.float64)
    pdf = torch.exp(-0.5 * xs**2) * math.sqrt(2.0 / math.pi)  # half-normal density
    q = step * torch.clamp(torch.round(xs / step), 1, P.unsigned_levels(bits))
    return float(torch.trapezoid((xs - q) ** 2 * pdf, xs))


@functools.lru_cache(maxsize=None)
def hwgq_optimal_step(bits: int) -> float:
    """The MSE-optimal HWGQ step ``D_b`` for a unit Gaussian, found by golden-section search.

    Computed once per ``bits`` and cached; agrees with the HWGQ paper's
    ``D_1..D_4 = 0.799, 0.538, 0.3217, 0.185`` to within 0.003.
    """
    lo, hi = 1e-3, 3.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = hwgq_mse(a, bits), hwgq_mse(b, bits)
    while hi - lo > 1e-6:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = hwgq_mse(a, bits)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = hwgq_mse(b, bits)
    return (lo + hi) / 2


class FilterWeightQuantizer(WeightQuantizer):
    """One scale per output filter: binary ``mean|w_f| · sign(w)`` at 1 bit (BWN, HWGQ-Net),
    uniform with clip ``max|w_f|`` at more bits."""

    def __init__(self, cfg: QuantConfig, out_channels: int, layer_name: str = "") -> None:
        super().__init__(cfg, out_channels, layer_name, quant_groups=out_channels)

    def forward(self, w: Tensor) -> Tensor:
        if not self._on["quant_on"]:
            return w
        if self.bits == 1:
            return P.binarize(w, self.quant_groups)
        return P.fake_quant_signed(w, P.group_abs_max(w, self.quant_groups), self.bits, axis=0)

    @torch.no_grad()
    def to_integer(self, w: Tensor) -> tuple[Tensor, Tensor]:
        if self.bits == 1:
            return P.binary_codes(self.forward(w))
        codes, step = P.integer_codes_signed(w, P.group_abs_max(w, self.quant_groups), self.bits, axis=0)
        return codes.to(torch.int32), step

    @torch.no_grad()
    def clip_value(self, w: Tensor) -> Tensor | None:
        if not self._on["quant_on"]:
            return None
        return P.group_abs_mean(w, self.quant_groups) if self.bits == 1 else P.group_abs_max(w, self.quant_groups)


class HWGQActQuantizer(ActQuantizer):
    """HWGQ in place of the ReLU (quantization on), the plain ReLU / ReLU6 otherwise."""

    def __init__(self, cfg: QuantConfig, upper: float | None = None, layer_name: str = "") -> None:
        super().__init__(cfg, upper, layer_name)
        self.hwgq_backward = cfg.hwgq_backward.value
        self.hwgq_step = float(cfg.hwgq_step or hwgq_optimal_step(self.bits))

    def forward(self, x: Tensor) -> Tensor:
        return hwgq(x, self.hwgq_step, self.bits, self.hwgq_backward) if self._on["quant_on"] else self.act(x)

    def clip_value(self) -> Tensor | None:
        return torch.tensor(self.hwgq_step * P.unsigned_levels(self.bits))

    def export_grid(self, channels: int | None) -> ActGrid:
        return ActGrid(torch.tensor(self.hwgq_step), 1, P.unsigned_levels(self.bits), zero_nonpositive=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, D={self.hwgq_step:.4f}, backward={self.hwgq_backward}"


def _validate(cfg: QuantConfig, where: str) -> None:
    if cfg.hwgq_step is not None and (
        not isinstance(cfg.hwgq_step, (int, float)) or isinstance(cfg.hwgq_step, bool) or not cfg.hwgq_step > 0
    ):
        raise ValueError(f"{where}QuantConfig.hwgq_step={cfg.hwgq_step!r} must be a number > 0")


# inputs: HWGQ's half-wave rule has no signed form; an EMA(max |x|) clip (``group``'s rule) instead
register(Method.hwgq, weight=FilterWeightQuantizer, act=HWGQActQuantizer, validate=_validate, input=ThresholdActQuantizer)
