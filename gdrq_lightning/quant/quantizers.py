"""Thin ``nn.Module`` quantizers: they hold state (switches, EMA statistics, learned
steps) and call the pure math in :mod:`.primitives`.

Switches are registered buffers, so the training phase is part of every checkpoint;
a Python mirror of them avoids a device sync on every forward pass.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import primitives as P
from .config import Method, QuantConfig

_THRESHOLD_METHODS = (Method.gdrq, Method.scale_clip, Method.group, Method.hwgq)


class _Switches(nn.Module):
    """Boolean switches kept as buffers (checkpointed) and mirrored in ``self._on``."""

    switch_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        for name in self.switch_names:
            self.register_buffer(name, torch.tensor(True))
        self._on = dict.fromkeys(self.switch_names, True)

    def set_switches(self, **flags: bool) -> None:
        """Turn switches on or off, e.g. ``set_switches(quant_on=False)``."""
        for name, value in flags.items():
            if name not in self.switch_names:
                raise KeyError(f"{type(self).__name__} has no switch {name!r}; known: {self.switch_names}")
            getattr(self, name).fill_(bool(value))
            self._on[name] = bool(value)

    def is_on(self, name: str) -> bool:
        return self._on[name]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._on = {name: bool(getattr(self, name)) for name in self.switch_names}


class WeightQuantizer(_Switches):
    """Quantizes a conv/linear weight ``[C_out, ...]`` (SPEC §1–§5).

    Switches: ``clip_on`` (Scale-Clip, gdrq/scale_clip only), ``quant_on`` (weight
    quantization), ``groups_on`` (``G`` groups instead of one; threshold methods).
    """

    switch_names = ("clip_on", "quant_on", "groups_on")

    def __init__(self, cfg: QuantConfig, out_channels: int, layer_name: str = "") -> None:
        super().__init__()
        self.method = cfg.method
        self.bits = cfg.weight_bits
        self.k = cfg.k_w
        self.project = cfg.project
        self.layer_name = layer_name
        self.groups = out_channels if cfg.weight_groups is None else cfg.weight_groups
        if out_channels % self.groups:
            raise ValueError(
                f"layer '{layer_name}': groups={self.groups} does not divide its {out_channels} output channels"
            )
        if self.method == Method.lsq:
            self.step = nn.Parameter(torch.ones(self.groups))
            self.register_buffer("initialized", torch.tensor(False))

    @property
    def uses_scale_clip(self) -> bool:
        return self.method in (Method.gdrq, Method.scale_clip)

    @property
    def n_groups(self) -> int:
        """Groups in use now: ``G`` when the groups switch is on (LSQ and HWGQ always)."""
        if self.method in (Method.lsq, Method.hwgq) or self._on["groups_on"]:
            return self.groups
        return 1

    def threshold(self, w: Tensor) -> Tensor:
        """Scale-Clip threshold ``T_g = k_w * mean|W_g|`` for the groups in use, ``[G]``."""
        return P.scale_clip_threshold(w, self.n_groups, self.k)

    def forward(self, w: Tensor) -> Tensor:
        clip = self._on["clip_on"] and self.uses_scale_clip
        quant = self._on["quant_on"]
        if not (clip or quant):
            return w
        if self.method in (Method.dorefa, Method.pact):
            return P.binarize(w, 1) if self.bits == 1 else P.dorefa_weight(w, self.bits)
        if self.method == Method.lsq:
            return self._lsq(w)
        return self._threshold_quant(w, clip, quant)

    def _threshold_quant(self, w: Tensor, clip: bool, quant: bool) -> Tensor:
        groups = self.n_groups
        if clip and quant and self.bits > 1:  # GDRQ / Scale-Clip: threshold, clip, quantize in one node
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

    def _lsq(self, w: Tensor) -> Tensor:
        n = P.signed_levels(self.bits)
        if not self.initialized:
            with torch.no_grad():
                init = [P.lsq_init_step(g, n) for g in w.reshape(self.groups, -1)]
                self.step.copy_(torch.stack(init).clamp_min(1e-8))
                self.initialized.fill_(True)
        g = P.lsq_grad_scale(w.numel() // self.groups, n)
        return P.lsq_fake_quant(w, P.expand_bshape(self.step, w, 0), -n, n, g)

    @torch.no_grad()
    def to_integer(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Integer codes (int32, shaped like ``w``) and per-output-channel steps ``[C_out]``.

        ``codes * step`` reproduces ``forward(w)`` with quantization on; used by export.
        """
        c_out = w.shape[0]
        bshape = (-1,) + (1,) * (w.dim() - 1)
        if self.method in (Method.dorefa, Method.pact) and self.bits > 1:
            n = P.unsigned_levels(self.bits)
            codes = torch.round(self.forward(w) * n)
            return codes.to(torch.int32), torch.full((c_out,), 1.0 / n, device=w.device)
        if self.method == Method.lsq:
            n = P.signed_levels(self.bits)
            step = self.step.repeat_interleave(c_out // self.groups)
            codes = torch.round(torch.clamp(w / step.reshape(bshape), -n, n))
            return codes.to(torch.int32), step.clone()
        wq = self.forward(w)
        if self.bits == 1:
            step = wq.reshape(c_out, -1).abs().amax(dim=1).clamp_min(1e-12)
            return torch.sign(wq).to(torch.int32), step
        clip = self._on["clip_on"] and self.uses_scale_clip
        w_in = P.clip_symmetric(w, self.threshold(w)) if clip else w
        alpha = self.threshold(w) if clip else P.group_abs_max(w, self.n_groups)
        codes, step = P.integer_codes_signed(w_in, alpha, self.bits, axis=0)
        return codes.to(torch.int32), step

    @torch.no_grad()
    def project_(self, w: Tensor) -> None:
        """Write the Scale-Clip clamp back into ``w`` (``project=True``)."""
        if self.project and self.uses_scale_clip and self._on["clip_on"]:
            w.copy_(P.clip_symmetric(w, self.threshold(w)))

    def extra_repr(self) -> str:
        return f"method={self.method.value}, bits={self.bits}, groups={self.groups}, k_w={self.k}"


class ActQuantizer(_Switches):
    """Applies the ReLU (or ReLU6) and quantizes its output (SPEC §1, §2, §4, §5).

    It takes the activation's *input*: HWGQ replaces the ReLU as a whole, PACT and
    DoReFa clip it themselves. Switches: ``clip_on`` (Scale-Clip), ``quant_on``.
    """

    switch_names = ("clip_on", "quant_on")

    def __init__(self, cfg: QuantConfig, upper: float | None = None, layer_name: str = "") -> None:
        super().__init__()
        self.method = cfg.method
        self.bits = cfg.act_bits
        self.k = cfg.k_a
        self.momentum = cfg.momentum
        self.act_groups = cfg.act_groups
        self.upper = upper
        self.layer_name = layer_name
        self.hwgq_backward = cfg.hwgq_backward.value
        self.hwgq_step = cfg.hwgq_step or (P.hwgq_optimal_step(self.bits) if self.method == Method.hwgq else None)
        self.pact_decay = cfg.pact_decay
        # Statistics for the threshold methods: EMA of mean|a| (Scale-Clip) or of max a (group).
        self.register_buffer("running_abs_mean", torch.zeros(self.act_groups))
        self.register_buffer("running_max", torch.zeros(self.act_groups))
        self.register_buffer("initialized", torch.tensor(False))
        if self.method == Method.pact:
            self.alpha = nn.Parameter(torch.tensor([float(cfg.pact_alpha_init)]))
        if self.method == Method.lsq:
            self.step = nn.Parameter(torch.ones(1))
            self.register_buffer("step_initialized", torch.tensor(False))

    @property
    def uses_scale_clip(self) -> bool:
        return self.method in (Method.gdrq, Method.scale_clip)

    def _act(self, x: Tensor) -> Tensor:
        return torch.relu(x) if self.upper is None else torch.clamp(x, 0.0, self.upper)

    def forward(self, x: Tensor) -> Tensor:
        quant = self._on["quant_on"]
        if self.method == Method.hwgq:
            return P.hwgq(x, self.hwgq_step, self.bits, self.hwgq_backward) if quant else self._act(x)
        if self.method == Method.dorefa:
            return P.dorefa_act(x, self.bits) if quant else self._act(x)
        if self.method == Method.pact:
            return P.pact_act(x, self.alpha, self.bits, self.pact_decay) if quant else self._act(x)
        if self.method != Method.lsq and quant and self.upper is None:
            return self._relu_quant(x)
        y = self._act(x)
        if self.method == Method.lsq:
            return self._lsq(y) if quant else y
        if self.training:
            self._observe(y)
        clip = self._on["clip_on"] and self.uses_scale_clip
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
        """Clip value ``alpha_a``: ``k_a * EMA(mean|a|)`` (Scale-Clip) or ``EMA(max a)``, ``[groups]``."""
        # a fresh tensor: a ReLU module called twice per forward updates the buffers in between
        alpha = self.k * self.running_abs_mean if self.uses_scale_clip else self.running_max.clone()
        return alpha.clamp(max=self.upper) if self.upper is not None else alpha

    @torch.no_grad()
    def _observe(self, y: Tensor) -> None:
        # only the statistic this method's threshold reads (one pass over ``y``, not two);
        # the other buffer stays 0
        scale_clip = self.uses_scale_clip
        if self.act_groups == 1:
            stats = (y.mean() if scale_clip else y.amax()).reshape(1).float()
        else:
            if y.dim() < 2 or y.shape[1] % self.act_groups:
                raise ValueError(
                    f"layer '{self.layer_name}': act_groups={self.act_groups} does not divide its "
                    f"{y.shape[1] if y.dim() > 1 else 1} channels"
                )
            per_group = y.transpose(0, 1).reshape(self.act_groups, -1)
            stats = (per_group.mean(dim=1) if scale_clip else per_group.amax(dim=1)).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # every rank keeps the same thresholds
            stats /= dist.get_world_size()
        running = self.running_abs_mean if scale_clip else self.running_max
        # ``where`` on the flag instead of ``if self.initialized``: no host-device sync
        running.copy_(torch.where(~self.initialized, stats, running.lerp(stats, self.momentum)))
        self.initialized.fill_(True)

    def _lsq(self, y: Tensor) -> Tensor:
        n = P.unsigned_levels(self.bits)
        if not self.step_initialized and self.training:
            with torch.no_grad():
                self.step.copy_(P.lsq_init_step(y, n).clamp_min(1e-8).reshape(1))
                self.step_initialized.fill_(True)
        g = P.lsq_grad_scale(y[0].numel() if y.dim() > 1 else y.numel(), n)
        return P.lsq_fake_quant(y, self.step, 0, n, g)

    def extra_repr(self) -> str:
        extra = f", D={self.hwgq_step:.4f}, backward={self.hwgq_backward}" if self.method == Method.hwgq else ""
        return f"method={self.method.value}, bits={self.bits}, k_a={self.k}, act_groups={self.act_groups}{extra}"
