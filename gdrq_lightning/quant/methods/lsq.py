"""LSQ (docs/methods.md#baselines): learned step size ``s`` per weight group / per activation layer, gradient
scale ``1 / sqrt(N · Q_p)``, initialised to ``2 · mean|x| / sqrt(Q_p)`` on the first batch."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import primitives as P
from ..config import Method, QuantConfig
from ..distributed import reduce_
from ..quantizers import ActGrid, ActQuantizer, WeightQuantizer
from ..registry import register


class GradScale(torch.autograd.Function):
    """Identity forward (bit for bit), gradient multiplied by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scale).

    A custom function rather than ``(x - x*scale).detach() + x*scale``, whose forward
    differs from ``x`` by an ulp and so moves LSQ's step off the stored parameter.
    """
    return GradScale.apply(x, scale)


def lsq_fake_quant(x: Tensor, step: Tensor, qmin: int, qmax: int, g: float) -> Tensor:
    """LSQ ``s * round(clamp(x / s, qmin, qmax))`` with learnable ``step`` (broadcastable).

    Autograd through this expression yields the LSQ gradient for ``s``:
    ``-x/s + round(x/s)`` inside the range, ``qmin``/``qmax`` outside, scaled by ``g``.
    """
    s = grad_scale(step, g)
    return P.round_ste(torch.clamp(x / s, qmin, qmax)) * s


def lsq_grad_scale(n_elements: int, qmax: int) -> float:
    """LSQ gradient scale ``1 / sqrt(N * Q_p)``."""
    return 1.0 / math.sqrt(max(n_elements * qmax, 1))


def lsq_init_step(x: Tensor, qmax: int) -> Tensor:
    """LSQ step initialisation ``2 * mean(|x|) / sqrt(Q_p)``."""
    return 2 * x.detach().abs().mean() / math.sqrt(qmax)


class LSQWeightQuantizer(WeightQuantizer):
    """Signed grid ``[-n, n]`` with a learned step per filter group (``G`` groups always)."""

    def __init__(self, cfg: QuantConfig, out_channels: int, layer_name: str = "") -> None:
        super().__init__(cfg, out_channels, layer_name, quant_groups=cfg.groups)
        self.step = nn.Parameter(torch.ones(self.quant_groups))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # Python mirror of ``initialized``: no device sync, no graph break

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    def forward(self, w: Tensor) -> Tensor:
        if not self._on["quant_on"]:
            return P.attach(w, self.step)
        n = P.signed_levels(self.bits)
        if not self._ready:  # the weights are the same on every rank: so is this
            with torch.no_grad():
                init = [lsq_init_step(g, n) for g in w.reshape(self.quant_groups, -1)]
                self.step.copy_(torch.stack(init).clamp_min(1e-8))
                self.initialized.fill_(True)
            self._ready = True
        g = lsq_grad_scale(w.numel() // self.quant_groups, n)
        return lsq_fake_quant(w, P.expand_bshape(self.step.to(w.dtype), w, 0), -n, n, g)

    @torch.no_grad()
    def to_integer(self, w: Tensor) -> tuple[Tensor, Tensor]:
        n = P.signed_levels(self.bits)
        step = self.step.repeat_interleave(w.shape[0] // self.quant_groups)
        codes = torch.round(torch.clamp(w / step.reshape(P.channel_shape(w, 0)), -n, n))
        return codes.to(torch.int32), step.clone()

    @torch.no_grad()
    def clip_value(self, w: Tensor) -> Tensor | None:
        return self.step.detach() * P.signed_levels(self.bits) if self._on["quant_on"] else None


class LSQActQuantizer(ActQuantizer):
    """Unsigned grid ``[0, n]`` after the ReLU with a learned step, initialised from the first
    training batch."""

    def __init__(self, cfg: QuantConfig, upper: float | None = None, layer_name: str = "") -> None:
        super().__init__(cfg, upper, layer_name)
        self.step = nn.Parameter(torch.ones(1))
        self.register_buffer("step_initialized", torch.tensor(False))
        self._ready = False  # Python mirror of ``step_initialized``

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.step_initialized)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(x)
        if not self._on["quant_on"]:
            return P.attach(y, self.step)
        n = P.unsigned_levels(self.bits)
        if not self._ready and self.training:
            with torch.no_grad():  # from every rank's first batch: the mean, so replicas stay equal
                init = reduce_(lsq_init_step(y, n).float().reshape(1), "mean")
                self.step.copy_(init.clamp_min(1e-8))
                self.step_initialized.fill_(True)
            self._ready = True
        g = lsq_grad_scale(y[0].numel() if y.dim() > 1 else y.numel(), n)
        return lsq_fake_quant(y, self.step.to(y.dtype), 0, n, g)

    def clip_value(self) -> Tensor | None:
        return self.step.detach().reshape(()) * P.unsigned_levels(self.bits)

    def export_grid(self, channels: int | None) -> ActGrid:
        step = self.step.detach().float().reshape(())
        n = P.unsigned_levels(self.bits)
        qmax = n if self.upper is None else min(n, int(torch.round(self.upper / step)))
        return ActGrid(step, 0, qmax)


def _validate(cfg: QuantConfig, where: str) -> None:
    if cfg.method == Method.lsq and cfg.weight_bits < 2:
        raise ValueError(
            f"{where}QuantConfig.weight_bits=1 is invalid for method 'lsq' (needs >= 2 bits for more than one level)"
        )


register(Method.lsq, weight=LSQWeightQuantizer, act=LSQActQuantizer, validate=_validate, input=LSQActQuantizer)
