"""Per-step guards: stop on a non-finite quantizer value, keep projected weights inside their clip."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from ..quant import named_quantizers, quantized_layers


def check_quantizers_finite(model: nn.Module, step: int) -> None:
    """Stop training when a quantizer's statistic or learned scale is NaN/Inf, naming the layer.

    One fused check per step (a single host sync); the slow search runs only on failure.

    Raises:
        FloatingPointError: names the first layer with a non-finite value.
    """
    tensors = list(_quantizer_tensors(model))
    if not tensors or bool(torch.isfinite(torch.cat([t.detach().reshape(-1).float() for _, t in tensors])).all()):
        return
    name = next(n for n, t in tensors if not bool(torch.isfinite(t.detach()).all()))
    raise FloatingPointError(f"non-finite quantizer value {name} at global step {step}; the last good checkpoint is kept")


def _quantizer_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every floating-point parameter and buffer of every quantizer (statistics, learned scales)."""
    for name, q in named_quantizers(model):
        for attr, t in (*q.named_parameters(), *q.named_buffers()):
            if t.is_floating_point():
                yield f"{name}.{attr}", t


def project_weights(model: nn.Module) -> None:
    """Write each ``project`` quantizer's clamp back into its layer's weights (after an optimizer step)."""
    for _, layer in quantized_layers(model):
        quantizer = getattr(layer, "weight_quantizer", None)
        if quantizer is not None and quantizer.project:
            quantizer.project_(layer.weight)
