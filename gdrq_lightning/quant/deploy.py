"""The deploy form's state and arithmetic on the quantized layers (docs/methods.md#deploy-form).

In deploy form (:func:`gdrq_lightning.export.simulate_deploy`) a quantized network computes, in
PyTorch and trainable, what ONNX Runtime computes for its export: every activation on a fixed
grid (:class:`ActDeploy`), and every conv/linear that export makes an integer kernel as that
kernel (:class:`LayerDeploy`): integer codes accumulated exactly, an int32 bias on the lattice
``s_x · s_w``, and ONNX Runtime's requantization

    ``y = clamp(round_half_even(f32(acc + bias) · f32(f32(s_x · s_w) / s_y)), q_min, q_max)``

with the BatchNorm (frozen statistics, trainable affine) folded into ``s_w`` and the bias.
Every rounding has a straight-through gradient, so training goes on in this form.

The state is buffers that every quantized layer has from construction (off by default): a
checkpoint has the same keys before and after the switch, and one written before the deploy
form existed loads with the defaults (see :meth:`_DeployBuffers._load_from_state_dict`). The
Python mirrors of the buffers (``_mode``, the grids' ranges) keep the forward pass free of
device syncs; they are read from the state dict's own tensors, so a model on the ``meta``
device loads them too.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .primitives import attach, round_ste
from .quantizers import ActGrid

OFF, FLOAT, DIRECT, OWN_GRID = 0, 1, 2, 3  # LayerDeploy.mode: see its docstring
EXACT_FLOAT32 = 2**24  # integers below this add up exactly in float32


def grid_fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """``scale · clamp(round(x / scale), qmin, qmax)``, as ``QuantizeLinear`` computes it
    (``x / s``, round half to even); gradient 1 where the rounded code is in range, else 0."""
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


def channel_view(t: Tensor, like: Tensor, axis: int) -> Tensor:
    """A per-channel vector ``t`` shaped to broadcast along ``axis`` of ``like``."""
    axis %= like.dim()
    return t.reshape([-1 if d == axis else 1 for d in range(like.dim())])


def requant_multiplier(lattice: Tensor, out_scale: Tensor) -> Tensor:
    """ONNX Runtime's ``QLinearConv`` multiplier ``f32(f32(s_x · s_w) / s_y)`` from ``lattice = f32(s_x · s_w)``
    (not ``lattice · (1 / s_y)``: one ulp apart for some channels, which moves a code now and then)."""
    return lattice / out_scale


def exact_sum(acc: Tensor, codes: Tensor) -> Tensor:
    """``f32(acc + codes)`` of integer-valued tensors, rounded once as ONNX Runtime's int32 -> float."""
    return (acc.double() + codes.double()).float()


class _DeployBuffers(nn.Module):
    """Buffers with defaults, floating ones kept float32 under ``.half()``, and loading that
    accepts a state dict without them (a checkpoint from before the deploy form)."""

    int_fields: ClassVar[tuple[str, ...]] = ()

    def reset(self) -> None:
        raise NotImplementedError

    def _sync(self, values: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if prefix + "mode" not in state_dict:  # no deploy state saved: off, not "missing keys"
            self.reset()
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync({k: state_dict[prefix + k] for k in self.int_fields if prefix + k in state_dict})

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self


def _int(t: Tensor) -> int:
    return int(t.reshape(-1)[0]) if t.numel() else 0


class ActDeploy(_DeployBuffers):
    """An activation's fixed output grid in deploy form: the activation quantizer's export grid
    (``ActGrid``) taken when the form was set up, ``scale`` per channel group."""

    int_fields = ("mode", "qmin", "qmax", "zero_nonpositive")

    def __init__(self, groups: int = 1, device: Any = None) -> None:
        super().__init__()
        self.groups = groups
        self.register_buffer("mode", torch.zeros((), dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(groups, device=device))
        self.register_buffer("qmin", torch.zeros((), dtype=torch.int32, device=device))
        self.register_buffer("qmax", torch.zeros((), dtype=torch.int32, device=device))
        self.register_buffer("zero_nonpositive", torch.zeros((), dtype=torch.bool, device=device))
        self._mode, self._range, self._znp = OFF, (0, 0), False

    @property
    def active(self) -> bool:
        return self._mode != OFF

    def reset(self) -> None:
        self.set_mode(OFF)

    def set_mode(self, mode: int) -> None:
        self.mode.fill_(mode)
        self._mode = mode

    @torch.no_grad()
    def set_grid(self, grid: ActGrid) -> None:
        """Fix the grid (``grid.scale``: 0-dim, or one value per channel group) and switch on."""
        self.scale.copy_(grid.scale.detach().float().reshape(-1).expand(self.groups))
        self.qmin.fill_(grid.qmin)
        self.qmax.fill_(grid.qmax)
        self.zero_nonpositive.fill_(grid.zero_nonpositive)
        self._range, self._znp = (grid.qmin, grid.qmax), bool(grid.zero_nonpositive)
        self.set_mode(1)

    def _sync(self, values: dict[str, Tensor]) -> None:
        self._mode = _int(values.get("mode", self.mode))
        self._range = (_int(values.get("qmin", self.qmin)), _int(values.get("qmax", self.qmax)))
        self._znp = bool(_int(values.get("zero_nonpositive", self.zero_nonpositive)))

    def grid(self, channels: int | None = None) -> ActGrid:
        """The grid as export writes it (per channel: ``channels`` values)."""
        scale = self.scale.reshape(()) if self.groups == 1 else self.scale.repeat_interleave((channels or self.groups) // self.groups)
        return ActGrid(scale.clone(), *self._range, self._znp)

    def forward(self, x: Tensor, quantizer: nn.Module) -> Tensor:
        dtype, x = x.dtype, x.float()  # codes and scales in float32 (a bf16 model: as far as bf16 carries them)
        scale = self.scale.reshape(()) if self.groups == 1 else channel_view(self.scale.repeat_interleave(x.shape[1] // self.groups), x, 1)
        y = grid_fake_quant(x, scale, *self._range)
        if self._znp:
            y = torch.where(x > 0, y, torch.zeros_like(y))
        # the method's own learned clip or step is not used now; a zero gradient keeps DDP's reducer whole
        return attach(y.to(dtype), *quantizer.parameters())

    def extra_repr(self) -> str:
        return f"mode={self._mode}, range={self._range}"


class LayerDeploy(_DeployBuffers):
    """A quantized conv/linear in deploy form. ``mode``: ``OFF``; ``FLOAT`` (export keeps the layer
    float: fake-quant weights, BatchNorm folded, bias added in float); ``DIRECT`` (an integer
    kernel whose output the next activation quantizer's grid, ``out_*``, takes); ``OWN_GRID``
    (an integer kernel with its own 8-bit output grid, zero point ``out_zero``). ``in_*`` is the
    grid of the layer's input (its own input quantizer's, or the activation that feeds it);
    ``folded``: a BatchNorm is folded in (linked by :meth:`link`, not saved: a module reference)."""

    int_fields = ("mode", "in_qmin", "in_qmax", "out_qmin", "out_qmax", "out_zero", "folded")

    def __init__(self, device: Any = None) -> None:
        super().__init__()
        self.register_buffer("mode", torch.zeros((), dtype=torch.int8, device=device))
        for prefix in ("in", "out"):
            self.register_buffer(f"{prefix}_scale", torch.ones((), device=device))
            self.register_buffer(f"{prefix}_qmin", torch.zeros((), dtype=torch.int32, device=device))
            self.register_buffer(f"{prefix}_qmax", torch.zeros((), dtype=torch.int32, device=device))
        self.register_buffer("out_zero", torch.zeros((), dtype=torch.int32, device=device))
        self.register_buffer("folded", torch.zeros((), dtype=torch.bool, device=device))
        self._mode, self._in, self._out, self._zero, self._folded = OFF, (0, 0), (0, 0), 0, False
        self.__dict__["_bn"] = None  # the folded BatchNorm: a reference, not a submodule

    @property
    def active(self) -> bool:
        return self._mode != OFF

    @property
    def bn(self) -> nn.Module | None:
        return self.__dict__["_bn"]

    def link(self, bn: nn.Module | None) -> None:
        """Point at the BatchNorm folded into this layer (``None``: none)."""
        if self._folded and bn is None:
            raise ValueError("this layer was put in deploy form with a BatchNorm folded in; link it")
        self.__dict__["_bn"] = bn

    def reset(self) -> None:
        self.mode.fill_(OFF)
        self.folded.fill_(False)
        self._mode, self._folded = OFF, False
        if self.bn is not None:  # its BatchNorm normalises on its own again
            release_batchnorm(self.bn)
        self.__dict__["_bn"] = None

    @torch.no_grad()
    def configure(self, mode: int, in_grid: ActGrid | None, out_grid: ActGrid | None, out_zero: int, folded: bool) -> None:
        """Set the form (grids fixed from here on) and switch on."""
        for prefix, grid in (("in", in_grid), ("out", out_grid)):
            if grid is not None:
                getattr(self, f"{prefix}_scale").copy_(grid.scale.detach().float().reshape(()))
                getattr(self, f"{prefix}_qmin").fill_(grid.qmin)
                getattr(self, f"{prefix}_qmax").fill_(grid.qmax)
        self.out_zero.fill_(out_zero)
        self.folded.fill_(folded)
        self.mode.fill_(mode)
        self._sync({})

    def _sync(self, values: dict[str, Tensor]) -> None:
        v = {k: _int(values.get(k, getattr(self, k))) for k in self.int_fields}
        self._mode, self._zero, self._folded = v["mode"], v["out_zero"], bool(v["folded"])
        self._in, self._out = (v["in_qmin"], v["in_qmax"]), (v["out_qmin"], v["out_qmax"])

    def grids(self) -> tuple[ActGrid, ActGrid]:
        """Input and output grids as export writes them."""
        return (ActGrid(self.in_scale.clone(), *self._in), ActGrid(self.out_scale.clone(), *self._out))

    # -- arithmetic ------------------------------------------------------------------------------
    def affine(self, layer: nn.Module) -> tuple[Tensor | None, Tensor | None]:
        """``(a, c)``: the folded BatchNorm ``y = a · layer(x) + c`` (``a`` None without one)."""
        bn = self.bn
        if bn is None:
            if self._folded:
                raise RuntimeError(
                    f"{type(layer).__name__} in deploy form lost its folded BatchNorm (a state dict was loaded): "
                    f"call gdrq_lightning.export.restore_deploy(model)"
                )
            return None, layer.bias
        a = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        c = bn.bias - bn.running_mean * a
        return a, (c if layer.bias is None else c + layer.bias * a)

    def integer_terms(self, layer: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """``(z, s_w, c, m)``: integer weight codes (times the power of two ``m`` that fills int8, signs
        of negative BatchNorm factors moved in; exact values, straight-through gradient to the weight),
        per-channel scale, folded float bias."""
        w_fq = layer.weight_quantizer(layer.weight).float()
        with torch.no_grad():
            codes, step = layer.weight_quantizer.to_integer(layer.weight.detach())
        step = step.to(w_fq)
        a, c = self.affine(layer)
        a, c = (None if a is None else a.float()), (None if c is None else c.float())
        factor = step if a is None else step * a
        sign = torch.where(factor.detach() < 0, -1.0, 1.0).to(w_fq)
        zi = codes.to(w_fq) * channel_view(sign, w_fq, 0)
        peak = zi.detach().abs().amax().clamp_min(1.0)
        m = torch.exp2(torch.floor(torch.log2(127.0 / peak))).clamp_min(1.0)
        g = w_fq * channel_view(sign * m / torch.where(step > 0, step, torch.ones_like(step)), w_fq, 0)
        z = zi * m + (g - g.detach())  # the codes exactly, the fake-quant weight's gradient
        return z, factor.abs() / m, c, m

    def _accumulate(self, layer: nn.Module, xq: Tensor, z: Tensor) -> Tensor:
        """``layer(xq, z)`` of integer codes, exactly: float32 on CPU while every sum stays below
        2^24; else float64, rounded (cuDNN may pick inexact algorithms)."""
        peak = max(abs(self._in[0]), abs(self._in[1]))
        if xq.device.type == "cpu" and 127 * z[0].numel() * peak < EXACT_FLOAT32:
            return layer._op(xq, z)
        acc = layer._op(xq.double(), z.double())
        return acc + (torch.round(acc) - acc).detach()

    def forward(self, layer: nn.Module, x: Tensor) -> Tensor:
        axis = (1 if x.dim() == 4 else 0) if isinstance(layer, nn.Conv2d) else -1  # a conv's input may be unbatched
        iq = layer.input_quantizer
        if self._mode != FLOAT:  # integer arithmetic in float32 (a bf16 model: as far as bf16 carries the codes)
            return self._integer(layer, x.float(), axis, iq).to(x.dtype)
        if iq is not None:  # FLOAT: the fake-quant layer with its BatchNorm folded in
            x = attach(grid_fake_quant(x, self.in_scale.to(x.dtype), *self._in), *iq.parameters())
        y = layer._op(x, layer.weight_quantizer(layer.weight))
        a, c = self.affine(layer)
        y = y if a is None else y * channel_view(a, y, axis)
        return y if c is None else y + channel_view(c, y, axis)

    def _integer(self, layer: nn.Module, x: Tensor, axis: int, iq: nn.Module | None) -> Tensor:
        s_x = self.in_scale
        xq = round_ste(x / s_x)
        if iq is not None:
            xq = attach(torch.clamp(xq, *self._in), *iq.parameters())
        z, s_w, c, _ = self.integer_terms(layer)
        acc = self._accumulate(layer, xq, z)
        lattice = s_x * s_w
        v = acc.float() if c is None else exact_sum(acc, channel_view(round_ste(c / lattice), acc, axis))
        s_y = self.out_scale
        u = v * channel_view(requant_multiplier(lattice, s_y), v, axis)
        return torch.clamp(round_ste(u), *self._out) * s_y

    def extra_repr(self) -> str:
        return f"mode={self._mode}, in={self._in}, out={self._out}, zero={self._zero}, folded={self._folded}"


# -- BatchNorms in deploy form ---------------------------------------------------------------------
def _identity(self: nn.Module, x: Tensor) -> Tensor:
    return x


def _running_stats(self: nn.Module, x: Tensor) -> Tensor:
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


_FROZEN_CLASSES: dict[tuple[type, bool], type] = {}


def freeze_batchnorm(bn: nn.Module, folded: bool) -> None:
    """Give ``bn`` a subclass whose forward is the identity (``folded``: a conv applies it) or
    normalises with the running statistics, in train mode too: its statistics stay frozen."""
    base = getattr(bn, "_deploy_base", type(bn))
    key = (base, folded)
    if key not in _FROZEN_CLASSES:
        name = f"{'Folded' if folded else 'Frozen'}{base.__name__}"
        _FROZEN_CLASSES[key] = type(name, (base,), {
            "forward": _identity if folded else _running_stats, "_deploy_base": base, "_deploy_folded": folded,
        })
    bn.__class__ = _FROZEN_CLASSES[key]


def release_batchnorm(bn: nn.Module) -> None:
    """Undo :func:`freeze_batchnorm`."""
    base = getattr(type(bn), "_deploy_base", None)
    if base is not None:
        bn.__class__ = base
