"""Running the schedule (docs/methods.md#schedule): which phases are due, what each one needs
before it begins (calibration, BatchNorm re-estimation), the switches it turns on and what it
freezes. The phases themselves are defined in :mod:`gdrq_lightning.schedule`."""
from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from ..quant import set_quant_state
from ..schedule import ALL_PHASES, Schedule
from ..utils.run import log_metrics
from .batchnorm import keep_frozen, reestimate_batchnorm
from .calibration import ACT_CLIP_PHASES, WEIGHT_CLIP_PHASES, calibrate_activation_clips, calibrate_weight_clips

SWITCH_OF_PHASE = {"scale_clip": "scale_clip", "quant_weights": "quant_weights", "quant_acts": "quant_acts", "groups": "groups"}
Prepare = Callable[[pl.Trainer, pl.LightningModule, nn.Module], None]  # runs right before a phase begins


def switch_off_all(network: nn.Module) -> None:
    """The ``fp`` phase: quantizers present, every switch off."""
    set_quant_state(network, **dict.fromkeys(SWITCH_OF_PHASE.values(), False))


def switch_on(network: nn.Module, phase: str, done: list[str]) -> None:
    """Turn on what ``phase`` turns on (idempotent, so a resumed run can replay ``done``)."""
    if phase in SWITCH_OF_PHASE:
        set_quant_state(network, **{SWITCH_OF_PHASE[phase]: True})
    else:
        freeze(network, done)


def freeze(network: nn.Module, done: list[str]) -> None:
    """Keep what the phases in ``done`` froze in eval mode (see :func:`.batchnorm.keep_frozen`)."""
    keep_frozen(network, bn="freeze_bn" in done, act_stats="freeze_act_stats" in done)


def begin_due_phases(
    schedule: Schedule, done: list[str], trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module, *,
    calib_batches: int, bn_recalib_batches: int, prepare: dict[str, Prepare] | None = None,
) -> list[str]:
    """Begin, in order, every phase whose start has been reached and that has not run (appended to
    ``done``): ``k_a: auto`` calibrated on float activations before ``scale_clip`` / ``quant_acts``
    switch on, BatchNorms re-estimated before ``freeze_bn``, ``prepare[phase]`` before its phase,
    ``k_w: auto`` after a weight phase. Returns the phases begun."""
    due = [p for p in schedule.due(trainer.current_epoch, trainer.global_step) if p not in done]
    if not due:
        return due
    if ACT_CLIP_PHASES & set(due) and calib_batches:  # before the switch: float activations
        calibrate_activation_clips(trainer, pl_module, network, calib_batches)
    for phase in due:
        if phase == "freeze_bn" and bn_recalib_batches:  # quantizers as the earlier phases left them
            reestimate_batchnorm(trainer, pl_module, network, bn_recalib_batches)
        if prepare and phase in prepare:
            prepare[phase](trainer, pl_module, network)
        done.append(phase)
        switch_on(network, phase, done)
        rank_zero_info(f"[gdrq] epoch {trainer.current_epoch} step {trainer.global_step}: phase '{phase}' begins")
        log_metrics(trainer, {"quant/phase": float(ALL_PHASES.index(phase) + 1)}, trainer.global_step)
    if WEIGHT_CLIP_PHASES & set(due):
        calibrate_weight_clips(network)
    return due
