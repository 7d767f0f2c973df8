"""Base classes of the quantizer modules: switches as buffers, construction through the
method registry, and the questions the rest of the library asks every method.

A method (``methods/<name>.py``) subclasses :class:`WeightQuantizer` and
:class:`ActQuantizer` with only the state it needs (EMA statistics, a learned clip or
step) and its math. ``WeightQuantizer(cfg, ...)`` / ``ActQuantizer(cfg, ...)`` build the
configured method's class (torchao's ``FakeQuantizerBase.from_config`` pattern), so a
layer never branches on the method. Switches are registered buffers, so the training
phase is part of every checkpoint; a Python mirror of them avoids a device sync on every
forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .config import Method, QuantConfig
from .registry import method_spec


class Switches(nn.Module):
    """Boolean switches kept as buffers (checkpointed) and mirrored in ``self._on``.

    Every quantizer carries the switches of the schedule's phases, so checkpoints of all
    methods have the same layout; a method reads the ones that mean something to it.
    """

    switch_names: ClassVar[tuple[str, ...]] = ()

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

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Statistics stay float32 when the model is cast (``.half()``, Lightning's ``bf16-true``):
        an EMA in bfloat16 cannot move by a 1% step. Parameters follow the model's dtype."""
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._on = {name: bool(getattr(self, name)) for name in self.switch_names}


def _method_class(cfg: QuantConfig, kind: str) -> type:
    return getattr(method_spec(cfg.method), kind)


class WeightQuantizer(Switches):
    """Quantizes a conv/linear weight ``[C_out, ...]`` (docs/methods.md).

    ``WeightQuantizer(cfg, out_channels, layer_name)`` returns the configured method's
    subclass. Switches: ``clip_on`` (Scale-Clip), ``quant_on``, ``groups_on`` (``G`` groups
    instead of one).
    """

    switch_names: ClassVar[tuple[str, ...]] = ("clip_on", "quant_on", "groups_on")
    project: bool = False  # write a clamp back into the weights after each optimizer step

    def __new__(cls, cfg: QuantConfig | None = None, *args: Any, **kwargs: Any) -> WeightQuantizer:
        if cls is WeightQuantizer and cfg is not None:
            cls = _method_class(cfg, "weight")
        return super().__new__(cls)

    def __init__(self, cfg: QuantConfig, out_channels: int, layer_name: str = "", *, quant_groups: int = 1) -> None:
        super().__init__()
        self.method = cfg.method
        self.bits = cfg.weight_bits
        self.layer_name = layer_name
        self.quant_groups = quant_groups  # quantization groups along C_out (not a conv's ``groups``)
        if out_channels % quant_groups:
            raise ValueError(f"layer '{layer_name}': groups={quant_groups} does not divide its {out_channels} output channels")

    @property
    def n_groups(self) -> int:
        """Quantization groups in use now (one scale each)."""
        return self.quant_groups

    @property
    def code_encoding(self) -> str:
        """How integer codes are stored: ``"signed"`` (``[-n, n]``) or ``"odd"`` (``Z = 2k - n``,
        binary weights and grids without a zero level)."""
        return "odd" if self.bits == 1 else "signed"

    def forward(self, w: Tensor) -> Tensor:
        raise NotImplementedError

    def to_integer(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Integer codes (int32, shaped like ``w``) and per-output-channel steps ``[C_out]``
        with ``codes * step`` equal to ``forward(w)`` with quantization on (used by export)."""
        raise NotImplementedError

    def clip_value(self, w: Tensor) -> Tensor | None:
        """The method's per-group clip bound for ``w`` (``[G]``), or ``None`` (for monitoring)."""
        return None

    def project_(self, w: Tensor) -> None:
        """Write the method's clamp back into ``w`` (only methods with ``project``)."""

    def calibrate(self, w: Tensor) -> None:
        """Choose data-dependent parameters from the weights ``w`` (methods with ``auto`` factors)."""

    def extra_repr(self) -> str:
        return f"method={self.method.value}, bits={self.bits}, groups={self.quant_groups}"


@dataclass
class ActGrid:
    """An activation quantizer's output in eval mode, as export writes it:
    ``scale * clamp(round(x / scale), qmin, qmax)``, with ``x <= 0`` mapped to 0 when
    ``zero_nonpositive`` (HWGQ's rule). ``scale`` is 0-dim or per channel ``[C]``."""

    scale: Tensor
    qmin: int
    qmax: int
    zero_nonpositive: bool = False


class ActQuantizer(Switches):
    """Applies the ReLU (``upper=None``) or ReLU6 (``upper=6``) and quantizes its output.

    It takes the activation's *input*, so a method may replace the ReLU as a whole or clip
    it itself. ``ActQuantizer(cfg, upper, layer_name)`` returns the configured method's
    subclass. Switches: ``clip_on`` (Scale-Clip), ``quant_on``.
    """

    switch_names: ClassVar[tuple[str, ...]] = ("clip_on", "quant_on")
    act_groups: int = 1

    def __new__(cls, cfg: QuantConfig | None = None, *args: Any, **kwargs: Any) -> ActQuantizer:
        if cls is ActQuantizer and cfg is not None:
            cls = _method_class(cfg, "act")
        return super().__new__(cls)

    def __init__(self, cfg: QuantConfig, upper: float | None = None, layer_name: str = "") -> None:
        super().__init__()
        self.method: Method = cfg.method
        self.bits = cfg.act_bits
        self.upper = upper
        self.layer_name = layer_name

    def act(self, x: Tensor) -> Tensor:
        """The float activation this module replaces."""
        return torch.relu(x) if self.upper is None else torch.clamp(x, 0.0, self.upper)

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def clip_value(self) -> Tensor | None:
        """The top of the quantization range in use now, or ``None`` (not known yet)."""
        return None

    def export_grid(self, channels: int | None) -> ActGrid:
        """The eval-mode output grid (``channels``: the input's channel count, when known)."""
        raise NotImplementedError(f"method {self.method.value!r} has no export form for activations")

    def begin_calibration(self) -> bool:
        """Start collecting calibration data from the coming forward passes; ``False`` when the
        method has nothing to calibrate (see :mod:`.calibration`)."""
        return False

    def calibration_errors(self) -> Tensor | None:
        """What the calibration window collected, as one float64 vector (summable over ranks)."""
        return None

    def finish_calibration(self, errors: Tensor) -> None:
        """Set the calibrated parameters from the (rank-summed) collected vector."""

    def pending_statistics(self) -> tuple[Tensor, str] | None:
        """Under DDP: this step's local statistic and how to reduce it (``"mean"`` / ``"max"``),
        waiting for :func:`~gdrq_lightning.quant.distributed.sync_statistics`."""
        return None

    def apply_statistics(self, stats: Tensor) -> None:
        """Update the running statistics with a rank-reduced batch statistic."""

    def extra_repr(self) -> str:
        return f"method={self.method.value}, bits={self.bits}"
