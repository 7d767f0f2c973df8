"""GDRQ and its two halves (SPEC §2–§3): ``scale_clip`` (Scale-Clip thresholds
``T = k · mean|x|``), ``group`` (``G`` filter groups, clip at ``max|W_g|`` / ``EMA(max a)``)
and ``gdrq`` (both).

Weights are clipped and quantized per group with a threshold recomputed on every forward
pass; activations keep an EMA of ``mean|a|`` (Scale-Clip) or ``max a`` (group) per channel
group, updated in training mode only and all-reduced across DDP ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import primitives as P
from ..config import Method, QuantConfig
from ..kernels import MIN_SCALE
from ..quantizers import ActGrid, ActQuantizer, WeightQuantizer
from . import register

_SCALE_CLIP = (Method.gdrq, Method.scale_clip)
_GROUPED = (Method.gdrq, Method.group)


class ThresholdWeightQuantizer(WeightQuantizer):
    """Scale-Clip (``clip_on``) and/or uniform quantization (``quant_on``) of ``G`` filter groups
    (``groups_on``; one group while it is off). The clip is ``k_w · mean|W_g|`` with Scale-Clip,
    else ``max|W_g|``; 1 bit binarizes with ``mean|W_g|``."""

    def __init__(self, cfg: QuantConfig, out_channels: int, layer_name: str = "") -> None:
        super().__init__(cfg, out_channels, layer_name, groups=cfg.groups if cfg.method in _GROUPED else 1)
        self.scale_clip = cfg.method in _SCALE_CLIP
        self.k = cfg.k_w
        self.project = cfg.project and self.scale_clip

    @property
    def n_groups(self) -> int:
        return self.groups if self._on["groups_on"] else 1

    def threshold(self, w: Tensor) -> Tensor:
        """Scale-Clip threshold ``T_g = k_w * mean|W_g|`` for the groups in use, ``[G]``."""
        return P.scale_clip_threshold(w, self.n_groups, self.k)

    def _clipping(self) -> bool:
        return self._on["clip_on"] and self.scale_clip

    def forward(self, w: Tensor) -> Tensor:
        clip, quant = self._clipping(), self._on["quant_on"]
        if not (clip or quant):
            return w
        groups = self.n_groups
        if clip and quant and self.bits > 1:  # threshold, clip and quantize in one node
            return P.scale_clip_fake_quant(w, groups, self.k, self.bits)
        if clip:
            alpha = self.threshold(w)
            w = P.clip_symmetric(w, alpha)
        if not quant:
            return w
        if self.bits == 1:
            return P.binarize(w, groups)
        if not clip:
            alpha = P.group_abs_max(w, groups)
        return P.fake_quant_signed(w, alpha, self.bits, axis=0)

    @torch.no_grad()
    def to_integer(self, w: Tensor) -> tuple[Tensor, Tensor]:
        if self.bits == 1:
            return P.binary_codes(self.forward(w))
        clip = self._clipping()
        alpha = self.threshold(w) if clip else P.group_abs_max(w, self.n_groups)
        codes, step = P.integer_codes_signed(P.clip_symmetric(w, alpha) if clip else w, alpha, self.bits, axis=0)
        return codes.to(torch.int32), step

    @torch.no_grad()
    def clip_value(self, w: Tensor) -> Tensor | None:
        """Scale-Clip's ``T_g`` (also before its phase begins, so a run logs it from the start),
        else the ``max|W_g|`` clip of quantization."""
        if self.scale_clip:
            return self.threshold(w)
        if self._on["quant_on"] and self.bits > 1:
            return P.group_abs_max(w, self.n_groups)
        return None

    @torch.no_grad()
    def project_(self, w: Tensor) -> None:
        if self.project and self._on["clip_on"]:
            w.copy_(P.clip_symmetric(w, self.threshold(w)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k_w={self.k}"


class ThresholdActQuantizer(ActQuantizer):
    """ReLU output clipped at ``k_a · EMA(mean|a|)`` (Scale-Clip) or ``EMA(max a)`` (group), per
    channel group; ``clip_on`` clips without quantizing (the reshaping phase)."""

    def __init__(self, cfg: QuantConfig, upper: float | None = None, layer_name: str = "") -> None:
        super().__init__(cfg, upper, layer_name)
        self.scale_clip = cfg.method in _SCALE_CLIP
        self.k = cfg.k_a
        self.momentum = cfg.momentum
        self.act_groups = cfg.act_groups
        # only the statistic the threshold reads: one pass over the activation, not two
        self.stat_name = "running_abs_mean" if self.scale_clip else "running_max"
        self.register_buffer(self.stat_name, torch.zeros(self.act_groups))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def running(self) -> Tensor:
        return getattr(self, self.stat_name)

    def forward(self, x: Tensor) -> Tensor:
        quant = self._on["quant_on"]
        if quant and self.upper is None:
            return self._relu_quant(x)
        y = self.act(x)
        if self.training:
            self._observe(y)
        clip = self._on["clip_on"] and self.scale_clip
        if not (clip or quant):
            return y
        alpha = self.threshold()
        axis = 1 if self.act_groups > 1 else None
        if not quant:
            return torch.minimum(y, P.expand_bshape(alpha, y, axis))
        return P.fake_quant_unsigned(y, alpha, self.bits, axis=axis)

    def _relu_quant(self, x: Tensor) -> Tensor:
        """The ReLU + statistics + fake-quant path as one autograd node (same math as above)."""
        y = None
        if self.training:
            with torch.no_grad():
                y = torch.relu(x)
                self._observe(y)
        axis = 1 if self.act_groups > 1 else None
        return P.relu_fake_quant(x, self.threshold(), self.bits, axis=axis, relu_out=y)  # reuses y

    def threshold(self) -> Tensor:
        """Clip value ``alpha_a``: ``k_a * EMA(mean|a|)`` (Scale-Clip) or ``EMA(max a)``, ``[act_groups]``."""
        alpha = self.k * self.running if self.scale_clip else self.running.clone()
        return alpha.clamp(max=self.upper) if self.upper is not None else alpha

    @torch.no_grad()
    def _observe(self, y: Tensor) -> None:
        if self.act_groups == 1:
            stats = (y.mean() if self.scale_clip else y.amax()).reshape(1).float()
        else:
            if y.dim() < 2 or y.shape[1] % self.act_groups:
                raise ValueError(
                    f"layer '{self.layer_name}': act_groups={self.act_groups} does not divide its "
                    f"{y.shape[1] if y.dim() > 1 else 1} channels"
                )
            per_group = y.transpose(0, 1).reshape(self.act_groups, -1)
            stats = (per_group.mean(dim=1) if self.scale_clip else per_group.amax(dim=1)).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # every rank keeps the same thresholds
            stats /= dist.get_world_size()
        running = self.running
        # ``where`` on the flag instead of ``if self.initialized``: no host-device sync
        running.copy_(torch.where(~self.initialized, stats, running.lerp(stats, self.momentum)))
        self.initialized.fill_(True)

    @torch.no_grad()
    def clip_value(self) -> Tensor | None:
        return self.threshold() if bool(self.initialized) else None

    def export_grid(self, channels: int | None) -> ActGrid:
        n = P.unsigned_levels(self.bits)
        scale = (self.threshold().detach().float() / n).clamp_min(MIN_SCALE)
        if self.act_groups == 1:
            return ActGrid(scale.reshape(()), 0, n)
        if channels is None:
            raise ValueError(
                f"layer '{self.layer_name}': act_groups={self.act_groups} needs the channel count from an example input"
            )
        return ActGrid(scale.repeat_interleave(channels // self.act_groups), 0, n)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k_a={self.k}, act_groups={self.act_groups}"


for _method in (Method.gdrq, Method.scale_clip, Method.group):
    register(_method, weight=ThresholdWeightQuantizer, act=ThresholdActQuantizer)
