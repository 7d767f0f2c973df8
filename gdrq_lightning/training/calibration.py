"""Calibration of ``auto`` clip factors when the phases that use them begin
(docs/methods.md#scale-clip): activations from a pass over training batches of the float
network, weights from the weights. The quantizer-level math is :mod:`gdrq_lightning.quant.calibration`."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from ..quant import ActQuantizer, WeightQuantizer, calibrate_weights, calibrating_activations
from ..task import quant_forward
from .batches import modes_kept, training_batches

ACT_CLIP_PHASES = frozenset({"scale_clip", "quant_acts"})  # their start (re)calibrates k_a: auto
WEIGHT_CLIP_PHASES = frozenset({"scale_clip", "quant_weights", "groups"})  # ... and k_w: auto


def k_range(model: nn.Module, kind: type) -> str:
    """The range of the ``auto`` factors of one kind of quantizer, for the log."""
    ks = sorted(float(q.k) for q in model.modules() if isinstance(q, kind) and getattr(q, "k_auto", False))
    return f"k from {ks[0]:.2f} to {ks[-1]:.2f}, median {ks[len(ks) // 2]:.2f}" if ks else "none"


@torch.no_grad()
def calibrate_activation_clips(trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module, batches: int) -> int:
    """Choose every ``k_a: auto`` factor from ``batches`` training batches of the float
    activations, network in eval mode (running BN statistics, EMAs untouched); returns how
    many activation quantizers were calibrated."""
    with modes_kept(network):
        network.eval()
        with calibrating_activations(network) as n:
            if n:
                for batch in training_batches(trainer, batches):
                    quant_forward(pl_module, batch)
    if n:
        rank_zero_info(f"[gdrq] k_a: auto calibrated on {n} activations from {batches} batches "
                       f"({k_range(network, ActQuantizer)})")
    return n


def calibrate_weight_clips(network: nn.Module) -> int:
    """Every ``k_w: auto`` factor from the current weights; returns how many layers have one."""
    n = calibrate_weights(network)
    if n:
        rank_zero_info(f"[gdrq] k_w: auto calibrated ({k_range(network, WeightQuantizer)})")
    return n
