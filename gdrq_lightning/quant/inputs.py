"""Input quantizers: a quantized conv/linear that reads a float tensor (an FPN sum, a
concatenation, a pooled or upsampled map) quantizes that input itself, so the exported graph
feeds every quantized layer integers and stays integer end to end.

Such inputs can be negative (an FPN sum has no ReLU), so the grid is signed and symmetric:
``sign(x) · q(|x|)`` with ``q`` the method's *unsigned* activation quantizer at ``b - 1`` bits,
i.e. the levels ``s · {-n, ..., n}``, ``n = 2**(b-1) - 1`` (one level fewer than a ReLU output
gets at ``b`` bits). Each method names its ``q`` in its ``register(..., input=...)`` call:
Scale-Clip (``gdrq``, ``scale_clip``) clips at ``k_a · EMA(mean|x|)``, ``group`` and ``hwgq`` at
``k · EMA(max|x|)``, the learned-clip method learns a symmetric clip, LSQ a step, DoReFa clips at 1.
Because ``q`` is an ordinary activation quantizer, the schedule (its ``quant_acts`` and
``clip_on`` switches), calibration of ``auto`` factors, DDP statistics and checkpoints treat it
like every other activation quantizer; it sits at ``<layer>.input_quantizer.magnitude``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .quantizers import ActGrid, ActQuantizer
from .registry import method_spec


class InputQuantizer(nn.Module):
    """Quantizes a layer's (signed) input to ``b = act_bits`` bits: ``sign(x) · q(|x|)``.

    The gradient is ``q``'s: straight through inside ``(-alpha, alpha)``, zero outside; a
    learned clip or step gets the gradients of ``q`` mirrored onto the negative half.

    Raises:
        ValueError: the method registers no input quantizer, or ``act_bits < 2`` (a signed grid
            needs two bits); the message names the layer.
    """

    def __init__(self, cfg: QuantConfig, layer_name: str = "") -> None:
        super().__init__()
        magnitude = method_spec(cfg.method).input
        if magnitude is None:
            raise ValueError(f"layer '{layer_name}': method {cfg.method.value!r} has no input quantizer")
        if cfg.act_bits < 2:
            raise ValueError(
                f"layer '{layer_name}': QuantConfig.act_bits={cfg.act_bits} is too few for a signed input grid "
                f"(quant_inputs needs >= 2 bits)"
            )
        self.bits = cfg.act_bits
        self.layer_name = layer_name
        half = dataclasses.replace(cfg, act_bits=cfg.act_bits - 1, skip=[], overrides={}, quant_inputs=[])
        self.magnitude: ActQuantizer = magnitude(half, upper=None, layer_name=f"{layer_name} (input)")

    def is_on(self) -> bool:
        """Whether the input is quantized now (the ``quant_acts`` phase has begun)."""
        return self.magnitude.is_on("quant_on")

    def forward(self, x: Tensor) -> Tensor:
        # always through ``q``: switched off it returns |x| (a learned clip stays in the graph for DDP)
        return torch.sign(x) * self.magnitude(x.abs())

    def export_grid(self, channels: int | None) -> ActGrid:
        """The signed eval-mode grid ``scale · clamp(round(x / scale), -n, n)``."""
        grid = self.magnitude.export_grid(channels)
        if grid.qmin != 0 or grid.zero_nonpositive:
            raise ValueError(f"layer '{self.layer_name}': the input quantizer's magnitude grid {grid} has no signed form")
        return ActGrid(grid.scale, -grid.qmax, grid.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed"
