"""Model-level calibration of ``auto`` clip factors (docs/methods.md#scale-clip): weights from the weights,
activations from forward passes over calibration batches, summed over DDP ranks in one
collective. The callback decides when; these functions only know the quantizers."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .distributed import reduce_
from .layers import QuantConv2d, QuantLinear
from .quantizers import ActQuantizer
from .swap import named_quantizers


@torch.no_grad()
def calibrate_weights(model: nn.Module) -> int:
    """Let every weight quantizer choose its ``auto`` factor from its layer's current weights;
    returns how many layers have one."""
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    for layer in layers:
        layer.weight_quantizer.calibrate(layer.weight)
    return sum(bool(getattr(m.weight_quantizer, "k_auto", False)) for m in layers)


@contextmanager
def calibrating_activations(model: nn.Module) -> Iterator[int]:
    """Inside: forward passes of ``model`` feed the k search of every ``auto`` activation
    quantizer (yields how many there are); those quantizers pass float activations on. On exit each sets its ``k`` from the errors summed
    over all passes and, under DDP, over all ranks (one ``all_reduce`` for all layers)."""
    quantizers = [q for _, q in named_quantizers(model) if isinstance(q, ActQuantizer) and q.begin_calibration()]
    try:
        yield len(quantizers)
    except BaseException:
        for q in quantizers:
            q._calib = None
        raise
    if not quantizers:
        return
    errors = [q.calibration_errors() for q in quantizers]
    flat = reduce_(torch.cat(errors), "sum")
    for q, e in zip(quantizers, flat.split([len(e) for e in errors])):
        q.finish_calibration(e)
