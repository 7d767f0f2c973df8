"""``GDRQCallback``: swaps layers at ``setup`` and drives the phase schedule (SPEC §6).

Every target layer is swapped in ``setup``, even in the ``fp`` phase (quantizers
present but off), so checkpoint keys never change between phases and the optimizer
(built after ``setup``) sees every quantizer parameter. Phases only flip switches
stored as buffers; the callback's own state is the list of phases that have run.

Around the switches it calibrates: ``auto`` clip factors when the phases that use them
begin (weights from the weights, activations from a pass over ``calib_batches`` training
batches), BatchNorm statistics re-estimated on the quantized network before they are
frozen, and, under DDP, the activation statistics of every layer reduced once per step.
"""
from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .monitoring import log_metrics
from .quant import (
    ActQuantizer, QuantConfig, WeightQuantizer, calibrate_weights, named_quantizers, quantize_model, quantized_layers,
    set_quant_state,
)
from .quant.distributed import sync_statistics
from .recalibrate import calibrate_activation_clips, reestimate_batchnorm
from .schedule import ALL_PHASES, Schedule
from .task import quant_network, resolve_config

STATE_VERSION = 1
_SWITCH_OF_PHASE = {"scale_clip": "scale_clip", "quant_weights": "quant_weights", "quant_acts": "quant_acts", "groups": "groups"}
_ACT_CLIP_PHASES = {"scale_clip", "quant_acts"}  # their start (re)calibrates k_a: auto
_WEIGHT_CLIP_PHASES = {"scale_clip", "quant_weights", "groups"}  # ... and k_w: auto


def _ks(model: nn.Module, kind: type) -> str:
    """The range of the ``auto`` factors of one kind of quantizer, for the log."""
    ks = sorted(float(q.k) for q in model.modules() if isinstance(q, kind) and getattr(q, "k_auto", False))
    return f"k from {ks[0]:.2f} to {ks[-1]:.2f}, median {ks[len(ks) // 2]:.2f}" if ks else "none"


def config_to_dict(config: QuantConfig) -> dict[str, Any]:
    """Plain-value dict of a config (no enums), safe for ``torch.load(weights_only=True)``."""
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(config).items()}


def check_quantizers_finite(model: nn.Module, step: int) -> None:
    """Stop training when a quantizer's statistic or learned scale is NaN/Inf, naming the layer.

    One fused check per step (a single host sync); the slow search runs only on failure.

    Raises:
        FloatingPointError: names the first layer with a non-finite value.
    """
    tensors = list(_quantizer_scales(model))
    if not tensors or bool(torch.isfinite(torch.cat([t.detach().reshape(-1).float() for _, t in tensors])).all()):
        return
    name = next(n for n, t in tensors if not bool(torch.isfinite(t.detach()).all()))
    raise FloatingPointError(f"non-finite quantizer value {name} at global step {step}; the last good checkpoint is kept")


def _quantizer_scales(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every floating-point parameter and buffer of every quantizer (statistics, learned scales)."""
    for name, q in named_quantizers(model):
        for attr, t in (*q.named_parameters(), *q.named_buffers()):
            if t.is_floating_point():
                yield f"{name}.{attr}", t


class GDRQCallback(Callback):
    """Quantize a LightningModule's network and schedule the quantization phases.

    The network is the task's :meth:`~gdrq_lightning.task.QuantTask.quant_network` (the
    whole module for a plain LightningModule). Per-layer statistics and plots are
    :class:`~gdrq_lightning.monitoring.QuantMonitor`'s job.

    Args:
        config: what to quantize and how (:class:`QuantConfig`).
        schedule: when each phase begins (:class:`Schedule`); default: all on from the start.
        summary_metric: a validation metric (e.g. ``val/acc1``) recorded at the end of
            each phase and printed as a table when training ends.
        calib_batches: training batches of the pass that calibrates ``k_a: auto`` when
            ``scale_clip`` or ``quant_acts`` begins (0: each layer's first training batch).
        bn_recalib_batches: training batches over which BatchNorm statistics are re-estimated
            on the quantized network when ``freeze_bn`` begins (0: freeze them as they are).
        k_w_every_n_steps: also recalibrate ``k_w: auto`` every N steps while Scale-Clip is
            on and reshapes the weights (None: only when a weight phase begins).

    Example:
        >>> cb = GDRQCallback(QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4),
        ...                   Schedule(scale_clip=1, quant_weights=2, quant_acts=3, groups=4, freeze_bn=5))
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        schedule: Schedule | None = None,
        *,
        summary_metric: str | None = None,
        calib_batches: int = 16,
        bn_recalib_batches: int = 50,
        k_w_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        config = QuantConfig() if config is None else config
        schedule = Schedule() if schedule is None else schedule
        if isinstance(config, dict):
            config = QuantConfig(**config)
        if isinstance(schedule, dict):
            schedule = Schedule(**schedule)
        if not isinstance(config, QuantConfig):
            raise TypeError(f"GDRQCallback(config=...) needs a QuantConfig or a dict of its fields, got {type(config).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"GDRQCallback(schedule=...) needs a Schedule or a dict of its fields, got {type(schedule).__name__}")
        for name, value, low in (("calib_batches", calib_batches, 0), ("bn_recalib_batches", bn_recalib_batches, 0),
                                 ("k_w_every_n_steps", k_w_every_n_steps, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"GDRQCallback({name}={value!r}) must be an integer >= {low}")
        self.config = config
        self.schedule = schedule
        self.summary_metric = summary_metric
        self.calib_batches = calib_batches
        self.bn_recalib_batches = bn_recalib_batches
        self.k_w_every_n_steps = k_w_every_n_steps
        self.done: list[str] = []
        self.phase_metrics: dict[str, float] = {}
        self._module_class = ""
        self._target: nn.Module | None = None

    # -- structure -------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """The latest phase that has begun (``fp`` before any)."""
        return self.done[-1] if self.done else "fp"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module_class = f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"
        target = quant_network(pl_module)
        if not quantized_layers(target):  # else already swapped (an earlier stage, or a pre-quantized module)
            quantize_model(target, resolve_config(self.config, pl_module))
            n = len(quantized_layers(target))
            rank_zero_info(f"[gdrq] quantized {n} layers ({self.config.method.value} W{self.config.weight_bits}A{self.config.act_bits})")
        self._target = target
        if stage == "fit":
            # Start in fp, also after a `validate` (everything on) or on a pre-quantized module:
            # `on_fit_start` turns the phases in `done` back on, and a resumed run gets its
            # switch buffers back from the checkpoint.
            set_quant_state(target, scale_clip=False, quant_weights=False, quant_acts=False, groups=False)

    # -- schedule ---------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for phase in self.done:  # idempotent: a resumed run continues in the same phase
            self._switch_on(phase)
        rank_zero_info(f"[gdrq] schedule: {self.schedule.describe()}; current phase: {self.phase}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._advance(trainer, pl_module)
        self._keep_frozen()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._advance(trainer, pl_module)
        self._keep_frozen()
        every = self.k_w_every_n_steps
        if every and "scale_clip" in self.done and trainer.global_step % every == 0:
            calibrate_weights(self._target)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        sync_statistics(self._target)  # under DDP: this step's activation statistics, one collective
        check_quantizers_finite(self._target, trainer.global_step)
        for _, layer in quantized_layers(self._target):
            quantizer = getattr(layer, "weight_quantizer", None)
            if quantizer is not None and quantizer.project:
                quantizer.project_(layer.weight)

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = [p for p in self.schedule.due(trainer.current_epoch, trainer.global_step) if p not in self.done]
        if not due:
            return
        if _ACT_CLIP_PHASES & set(due) and self.calib_batches:  # before the switch: float activations
            n = calibrate_activation_clips(trainer, pl_module, self._target, self.calib_batches)
            if n:
                rank_zero_info(f"[gdrq] k_a: auto calibrated on {n} activations from {self.calib_batches} batches ({_ks(self._target, ActQuantizer)})")
        for phase in due:
            if phase == "freeze_bn" and self.bn_recalib_batches:  # quantizers as the earlier phases left them
                n = reestimate_batchnorm(trainer, pl_module, self._target, self.bn_recalib_batches)
                rank_zero_info(f"[gdrq] re-estimated {n} BatchNorms on the quantized network ({self.bn_recalib_batches} batches)")
            self._begin(phase, trainer)
        if _WEIGHT_CLIP_PHASES & set(due) and calibrate_weights(self._target):
            rank_zero_info(f"[gdrq] k_w: auto calibrated ({_ks(self._target, WeightQuantizer)})")

    def _begin(self, phase: str, trainer: pl.Trainer) -> None:
        self._switch_on(phase)
        self.done.append(phase)
        rank_zero_info(f"[gdrq] epoch {trainer.current_epoch} step {trainer.global_step}: phase '{phase}' begins")
        log_metrics(trainer, {"quant/phase": float(ALL_PHASES.index(phase) + 1)}, trainer.global_step)

    def _switch_on(self, phase: str) -> None:
        if phase in _SWITCH_OF_PHASE:
            set_quant_state(self._target, **{_SWITCH_OF_PHASE[phase]: True})
        else:
            self._keep_frozen()

    def _keep_frozen(self) -> None:
        """Lightning puts the module in train mode each epoch: frozen parts go back to eval mode
        (BatchNorms normalise with, and stop updating, their running statistics; activation
        quantizers quantize with, and stop updating, their EMAs)."""
        frozen = (_BatchNorm,) * ("freeze_bn" in self.done) + (ActQuantizer,) * ("freeze_act_stats" in self.done)
        if frozen:
            for module in self._target.modules():
                if isinstance(module, frozen) and module.training:
                    module.eval()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.summary_metric) if self.summary_metric else None
        if value is not None and not trainer.sanity_checking:
            self.phase_metrics[self.phase] = float(value)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase_metrics:
            rows = ", ".join(f"{phase}: {value:.4f}" for phase, value in self.phase_metrics.items())
            rank_zero_info(f"[gdrq] {self.summary_metric} at the end of each phase -> {rows}")

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "done": list(self.done),
            "phase_metrics": dict(self.phase_metrics),
            "config": config_to_dict(self.config),
            "module": self._module_class,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"GDRQCallback state version {version!r} is not supported (expected {STATE_VERSION})")
        unknown = [p for p in state_dict["done"] if p not in ALL_PHASES]
        if unknown:
            raise ValueError(f"GDRQCallback checkpoint names unknown phases {unknown}")
        self.done = list(state_dict["done"])
        self.phase_metrics = dict(state_dict.get("phase_metrics", {}))
