"""GDRQ and its two halves (docs/methods.md#scale-clip, #group-quantization): ``scale_clip`` (Scale-Clip thresholds
``T = k · mean|x|``), ``group`` (``G`` filter groups, clip at ``max|W_g|`` / ``EMA(max a)``)
and ``gdrq`` (both).

Weights are clipped and quantized per group with a threshold recomputed on every forward
pass; activations keep an EMA of ``mean|a|`` (Scale-Clip) or ``max a`` (group) per channel
group, updated in training mode only and all-reduced across DDP ranks.

The factor ``k`` is a buffer (``quantizer.k``, in every checkpoint). A number in the config
is used as is (``group`` ignores it: its clip is the maximum, ``k = 1``); ``"auto"`` picks,
per layer and bit width, the ``k`` with the least quantization MSE of the layer's tensor
(:func:`~gdrq_lightning.quant.primitives.clip_errors`): for weights from the weights
themselves, for activations from calibration batches (``begin_calibration`` /
``finish_calibration``, summed over DDP ranks) or, until then, the first training batch.
``group`` with ``auto`` clips at ``k · max`` with the best ``k <= 1``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import primitives as P
from ..config import Method, QuantConfig
from ..distributed import reduce_, world_size
from ..kernels import MIN_SCALE
from ..quantizers import ActGrid, ActQuantizer, WeightQuantizer
from ..registry import register

_SCALE_CLIP = (Method.gdrq, Method.scale_clip)
_GROUPED = (Method.gdrq, Method.group)
_SAMPLES = 32768  # elements per tensor (per batch, for activations) that the k search looks at
AUTO_START = {"k_w": 2.0, "k_a": 4.0}  # k of an "auto" quantizer before it is calibrated


def _initial_k(cfg: QuantConfig, field: str) -> float:
    if cfg.method not in _SCALE_CLIP:
        return 1.0  # group: the clip is the maximum itself
    value = getattr(cfg, field)
    return AUTO_START[field] if value == "auto" else float(value)


class _CalibratedK(nn.Module):
    """The clip factor ``k`` as a buffer, and whether ``auto`` has chosen it yet (a buffer too,
    mirrored in Python so the forward pass checks it without a device sync or a graph break)."""

    def _init_k(self, cfg: QuantConfig, field: str) -> None:
        self.k_auto = getattr(cfg, field) == "auto"
        self.register_buffer("k", torch.tensor(_initial_k(cfg, field)))
        self.register_buffer("k_calibrated", torch.tensor(False))
        self._k_ready = not self.k_auto

    def _set_k(self, k: Tensor, seen: Tensor | None = None) -> None:
        """Use ``k`` (a 0-dim tensor: set without a host sync); with ``seen``, only where it is true."""
        if seen is None:
            self.k.copy_(k)
            self.k_calibrated.fill_(True)
        else:
            self.k.copy_(torch.where(seen, k, self.k))
            self.k_calibrated.logical_or_(seen)
        self._k_ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._k_ready = not self.k_auto or bool(self.k_calibrated)


class ThresholdWeightQuantizer(_CalibratedK, WeightQuantizer):
    """Scale-Clip (``clip_on``) and/or uniform quantization (``quant_on``) of ``G`` filter groups
    (``groups_on``; one group while it is off). The clip is ``k_w · mean|W_g|`` with Scale-Clip,
    else ``k · max|W_g|``; 1 bit binarizes with ``mean|W_g|``."""

    def __init__(self, cfg: QuantConfig, out_channels: int, layer_name: str = "") -> None:
        super().__init__(cfg, out_channels, layer_name, quant_groups=cfg.groups if cfg.method in _GROUPED else 1)
        self.scale_clip = cfg.method in _SCALE_CLIP
        self._init_k(cfg, "k_w")
        self.project = cfg.project and self.scale_clip

    @property
    def n_groups(self) -> int:
        return self.quant_groups if self._on["groups_on"] else 1

    def threshold(self, w: Tensor) -> Tensor:
        """Scale-Clip threshold ``T_g = k_w * mean|W_g|`` for the groups in use, ``[G]``."""
        return P.scale_clip_threshold(w, self.n_groups, self.k)

    def _range(self, w: Tensor) -> Tensor:
        """The quantization clip without Scale-Clip: ``k * max|W_g|`` for ``group`` with ``k: auto``,
        else ``max|W_g|`` (a Scale-Clip method's ``k`` multiplies ``mean|W_g|``, not the maximum)."""
        alpha = P.group_abs_max(w, self.n_groups)
        return alpha * self.k if self.k_auto and not self.scale_clip else alpha

    def _clipping(self) -> bool:
        return self._on["clip_on"] and self.scale_clip

    @torch.no_grad()
    def calibrate(self, w: Tensor) -> None:
        """``k_w: auto``: set ``k`` to the factor with the least quantization MSE of ``w`` for the
        groups in use now (a no-op for numeric ``k_w`` and binary weights)."""
        if not self.k_auto or self.bits == 1:
            return
        wv = w.detach().reshape(self.n_groups, -1)
        stat = wv.abs().mean(dim=1) if self.scale_clip else wv.abs().amax(dim=1)
        grid = P.clip_factor_grid("mean" if self.scale_clip else "max", w.device)
        errors = P.clip_errors(P.sample_columns(wv, _SAMPLES // self.n_groups), stat[:, None], grid, self.bits, True)
        self._set_k(P.best_clip_factor(grid, errors))

    def forward(self, w: Tensor) -> Tensor:
        clip, quant = self._clipping(), self._on["quant_on"]
        if not (clip or quant):
            return w
        if not self._k_ready:
            self.calibrate(w)
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
            alpha = self._range(w)
        return P.fake_quant_signed(w, alpha, self.bits, axis=0)

    @torch.no_grad()
    def to_integer(self, w: Tensor) -> tuple[Tensor, Tensor]:
        if self.bits == 1:
            return P.binary_codes(self.forward(w))
        clip = self._clipping()
        alpha = self.threshold(w) if clip else self._range(w)
        codes, step = P.integer_codes_signed(P.clip_symmetric(w, alpha) if clip else w, alpha, self.bits, axis=0)
        return codes.to(torch.int32), step

    @torch.no_grad()
    def clip_value(self, w: Tensor) -> Tensor | None:
        """Scale-Clip's ``T_g`` (also before its phase begins, so a run logs it from the start),
        else the ``max|W_g|`` clip of quantization."""
        if self.scale_clip:
            return self.threshold(w)
        if self._on["quant_on"] and self.bits > 1:
            return self._range(w)
        return None

    @torch.no_grad()
    def project_(self, w: Tensor) -> None:
        if self.project and self._on["clip_on"]:
            w.copy_(P.clip_symmetric(w, self.threshold(w)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k_w={'auto' if self.k_auto else float(self.k)}"


class ThresholdActQuantizer(_CalibratedK, ActQuantizer):
    """ReLU output clipped at ``k_a · EMA(mean|a|)`` (Scale-Clip) or ``k · EMA(max a)`` (group), per
    channel group; ``clip_on`` clips without quantizing (the reshaping phase)."""

    def __init__(self, cfg: QuantConfig, upper: float | None = None, layer_name: str = "") -> None:
        super().__init__(cfg, upper, layer_name)
        self.scale_clip = cfg.method in _SCALE_CLIP
        self._init_k(cfg, "k_a")
        self._calib: Tensor | None = None  # summed k-search errors while calibrating
        self.momentum = cfg.momentum
        self.act_groups = cfg.act_groups
        # only the statistic the threshold reads: one pass over the activation, not two
        self.stat_name = "running_abs_mean" if self.scale_clip else "running_max"
        self.register_buffer(self.stat_name, torch.zeros(self.act_groups))
        self.register_buffer("initialized", torch.tensor(False))
        self._ema_ready = False  # Python mirror of ``initialized``: no device sync to read it
        self._pending: Tensor | None = None  # this step's local statistic, under DDP

    @property
    def running(self) -> Tensor:
        return getattr(self, self.stat_name)

    @property
    def reduction(self) -> str:
        """How ranks combine this statistic: the mean of means, the max of maxima."""
        return "mean" if self.scale_clip else "max"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ema_ready, self._pending = bool(self.initialized), None

    def forward(self, x: Tensor) -> Tensor:
        if self._calib is not None:  # calibration measures the float activations
            y = self.act(x)
            self._calib += self._k_errors(y)
            return y
        if not self._k_ready and self.training:  # auto, never calibrated: the first training batch
            self.finish_calibration(self._k_errors(self.act(x)), reduce=True)
        quant = self._on["quant_on"]
        axis = 1 if self.act_groups > 1 else None
        if quant and self.upper is None:  # ReLU and fake-quant in one op; statistics from relu(x)
            if self.training:
                self._record(self._relu_stats(x))
            return P.relu_fake_quant(x, self.threshold(), self.bits, axis=axis)
        y = self.act(x)
        if self.training:
            self._observe(y)
        clip = self._on["clip_on"] and self.scale_clip
        if not (clip or quant):
            return y
        alpha = self.threshold()
        if not quant:
            return torch.minimum(y, P.expand_bshape(alpha, y, axis))
        return P.fake_quant_unsigned(y, alpha, self.bits, axis=axis)

    def threshold(self) -> Tensor:
        """Clip value ``alpha_a``: ``k_a * EMA(mean|a|)`` (Scale-Clip) or ``k * EMA(max a)``, ``[act_groups]``."""
        alpha = self.k * self.running  # a fresh tensor: the buffers may change before it is used
        return alpha.clamp(max=self.upper) if self.upper is not None else alpha

    def _grouped(self, y: Tensor) -> Tensor:
        if self.act_groups == 1:
            return y.reshape(1, -1)
        if y.dim() < 2 or y.shape[1] % self.act_groups:
            raise ValueError(
                f"layer '{self.layer_name}': act_groups={self.act_groups} does not divide its "
                f"{y.shape[1] if y.dim() > 1 else 1} channels"
            )
        return y.transpose(0, 1).reshape(self.act_groups, -1)

    @torch.no_grad()
    def _k_errors(self, y: Tensor) -> Tensor:
        """This batch's k-search errors ``[K]``: the clip is ``k`` times the batch's own statistic."""
        yv = self._grouped(y.detach())
        stat = yv.mean(dim=1) if self.scale_clip else yv.amax(dim=1)
        grid = P.clip_factor_grid("mean" if self.scale_clip else "max", y.device)
        sample = P.sample_columns(yv, _SAMPLES // self.act_groups)
        return P.clip_errors(sample, stat[:, None], grid, self.bits, False, self.upper)

    def begin_calibration(self) -> bool:
        """Start summing k-search errors over the next forward passes (``k_a: auto`` only); until
        :meth:`finish_calibration` the quantizer passes the float activation on, so every layer
        is calibrated on the activations of the float network in one pass."""
        if not self.k_auto:
            return False
        self._calib = torch.zeros(len(P.clip_factor_grid("mean")), dtype=torch.float64, device=self.k.device)
        return True

    def calibration_errors(self) -> Tensor | None:
        """The summed errors of the calibration window (``None`` when not calibrating)."""
        return self._calib

    @torch.no_grad()
    def finish_calibration(self, errors: Tensor, reduce: bool = False) -> None:
        """Set ``k`` from summed errors (``reduce``: first sum them over the DDP ranks).

        A layer that saw nothing keeps its ``k`` (and ``k_calibrated`` stays false), decided on the
        device: no host sync, so this traces into a compiled graph.
        """
        self._calib = None
        if reduce:
            reduce_(errors, "sum")
        grid = P.clip_factor_grid("mean" if self.scale_clip else "max", errors.device)
        self._set_k(P.best_clip_factor(grid, errors), seen=errors.sum() > 0)

    @torch.no_grad()
    def _batch_stats(self, y: Tensor) -> Tensor:
        """This batch's statistic of the activation ``y``, float32 ``[act_groups]``."""
        if self.act_groups == 1:
            return P.relu_mean(y) if self.scale_clip else y.amax().reshape(1).float()  # y >= 0: relu_mean is its mean
        per_group = self._grouped(y)
        return (per_group.mean(dim=1) if self.scale_clip else per_group.amax(dim=1)).float()

    @torch.no_grad()
    def _relu_stats(self, x: Tensor) -> Tensor:
        """:meth:`_batch_stats` of ``relu(x)``, per tensor without writing the ReLU's output."""
        if self.act_groups > 1:
            return self._batch_stats(torch.relu(x))
        return P.relu_mean(x) if self.scale_clip else x.detach().amax().clamp_min(0.0).reshape(1).float()

    def _observe(self, y: Tensor) -> None:
        self._record(self._batch_stats(y))

    @torch.no_grad()
    def _record(self, stats: Tensor) -> None:
        """Fold a batch statistic into the EMA (under DDP after the step, with every rank's)."""
        if self._pending is not None:  # the last step was never synchronised (no callback): now
            self.apply_statistics(reduce_(self._pending, self.reduction))
        if self._ema_ready and world_size() > 1:
            self._pending = stats  # reduced with every other layer's after the step
            return
        self.apply_statistics(reduce_(stats, self.reduction))

    def pending_statistics(self) -> tuple[Tensor, str] | None:
        return None if self._pending is None else (self._pending, self.reduction)

    @torch.no_grad()
    def apply_statistics(self, stats: Tensor) -> None:
        if self._ema_ready:  # the Python mirror of ``initialized``: no host-device sync
            self.running.lerp_(stats, self.momentum)
        else:
            self.running.copy_(stats)
            self.initialized.fill_(True)
        self._ema_ready, self._pending = True, None

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
        k = "auto" if self.k_auto else float(self.k)
        return f"{super().extra_repr()}, k_a={k}, act_groups={self.act_groups}"


for _method in (Method.gdrq, Method.scale_clip, Method.group):
    register(_method, weight=ThresholdWeightQuantizer, act=ThresholdActQuantizer, input=ThresholdActQuantizer)
