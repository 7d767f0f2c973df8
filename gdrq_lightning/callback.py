"""``GDRQCallback``: swaps the layers at ``setup`` and orchestrates the phase schedule
(docs/methods.md#schedule).

Every target layer is swapped in ``setup``, even in the ``fp`` phase (quantizers present but
off), so checkpoint keys never change between phases and the optimizer (built after ``setup``)
sees every quantizer parameter. Phases only flip switches stored as buffers; the callback's
own state is the list of phases that have run. The jobs it runs around the switches each live
in a module of :mod:`gdrq_lightning.training` (calibration, BatchNorm re-estimation, guards)
or :mod:`gdrq_lightning.quant.distributed` (DDP statistics).
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from .quant import QuantConfig, calibrate_weights, quantize_model, quantized_layers
from .quant.distributed import sync_statistics
from .schedule import ALL_PHASES, Schedule
from .task import quant_network, resolve_config
from .training.deploy import begin_deploy, link_deploy
from .training.guards import check_quantizers_finite, project_weights
from .training.phases import begin_due_phases, freeze, switch_off_all, switch_on

STATE_VERSION = 1


class GDRQCallback(Callback):
    """Quantize a LightningModule's network and schedule the quantization phases.

    The network is the task's :meth:`~gdrq_lightning.task.QuantTask.quant_network` (the whole
    module for a plain LightningModule). Statistics and plots are
    :class:`~gdrq_lightning.monitoring.QuantMonitor`'s job.

    Args:
        config: what to quantize and how (:class:`QuantConfig`, or a dict of its fields).
        schedule: when each phase begins (:class:`Schedule`, or a dict); default: all on from the start.
        summary_metric: a validation metric (e.g. ``val/acc1``) recorded at the end of each phase
            and printed when training ends.
        calib_batches: training batches of the pass that calibrates ``k_a: auto`` when
            ``scale_clip`` or ``quant_acts`` begins (0: each layer's first training batch), and
            that sets the deploy form's 8-bit grids when ``deploy`` begins (at least one).
        bn_recalib_batches: training batches over which BatchNorm statistics are re-estimated on
            the quantized network when ``freeze_bn`` begins (0: freeze them as they are).
        k_w_every_n_steps: also recalibrate ``k_w: auto`` every N steps while Scale-Clip is on
            (None: only when a weight phase begins).

    Example:
        >>> cb = GDRQCallback(QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4),
        ...                   Schedule(scale_clip=1, quant_weights=2, quant_acts=3, groups=4, freeze_bn=5))
    """

    def __init__(
        self, config: QuantConfig | None = None, schedule: Schedule | None = None, *, summary_metric: str | None = None,
        calib_batches: int = 16, bn_recalib_batches: int = 50, k_w_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.config = _typed("config", QuantConfig, config)
        self.schedule = _typed("schedule", Schedule, schedule)
        for name, value, low in (("calib_batches", calib_batches, 0), ("bn_recalib_batches", bn_recalib_batches, 0),
                                 ("k_w_every_n_steps", k_w_every_n_steps, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"GDRQCallback({name}={value!r}) must be an integer >= {low}")
        self.summary_metric, self.calib_batches = summary_metric, calib_batches
        self.bn_recalib_batches, self.k_w_every_n_steps = bn_recalib_batches, k_w_every_n_steps
        self.done: list[str] = []
        self.phase_metrics: dict[str, float] = {}
        self._module_class = ""
        self._target: nn.Module | None = None
        self._linked = False  # a checkpoint's deploy form linked up again in this stage

    @property
    def phase(self) -> str:
        """The latest phase that has begun (``fp`` before any)."""
        return self.done[-1] if self.done else "fp"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module_class = f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"
        self._target = target = quant_network(pl_module)
        if not quantized_layers(target):  # else already swapped (an earlier stage, or a pre-quantized module)
            quantize_model(target, resolve_config(self.config, pl_module))
            c = self.config
            rank_zero_info(f"[gdrq] quantized {len(quantized_layers(target))} layers ({c.method.value} W{c.weight_bits}A{c.act_bits})")
        self._linked = False
        if stage == "fit":  # start in fp; `on_fit_start` replays `done` (a resumed run, or after `validate`)
            switch_off_all(target)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for phase in self.done:  # idempotent: a resumed run continues in the same phase
            switch_on(self._target, phase, self.done)
        self._link()
        rank_zero_info(f"[gdrq] schedule: {self.schedule.describe()}; current phase: {self.phase}")

    def _link(self, *_: Any) -> None:
        """Weights from a checkpoint (loaded after ``setup``) in deploy form: link their BatchNorms, once."""
        if not self._linked:
            self._linked = True
            link_deploy(self._target)

    on_validation_start = on_test_start = on_predict_start = _link

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._advance(trainer, pl_module)
        freeze(self._target, self.done)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._advance(trainer, pl_module)
        freeze(self._target, self.done)
        every = self.k_w_every_n_steps
        if every and "scale_clip" in self.done and trainer.global_step % every == 0:
            calibrate_weights(self._target)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        sync_statistics(self._target)  # under DDP: this step's activation statistics, one collective
        check_quantizers_finite(self._target, trainer.global_step)
        project_weights(self._target)

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        begin_due_phases(self.schedule, self.done, trainer, pl_module, self._target, calib_batches=self.calib_batches,
                         bn_recalib_batches=self.bn_recalib_batches, prepare={"deploy": self._deploy})

    def _deploy(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module) -> None:
        begin_deploy(trainer, pl_module, network, self.calib_batches)
        self._linked = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.summary_metric) if self.summary_metric else None
        if value is not None and not trainer.sanity_checking:
            self.phase_metrics[self.phase] = float(value)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase_metrics:
            rows = ", ".join(f"{phase}: {value:.4f}" for phase, value in self.phase_metrics.items())
            rank_zero_info(f"[gdrq] {self.summary_metric} at the end of each phase -> {rows}")

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "done": list(self.done), "phase_metrics": dict(self.phase_metrics),
                "config": self.config.to_dict(), "module": self._module_class}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"GDRQCallback state version {version!r} is not supported (expected {STATE_VERSION})")
        unknown = [p for p in state_dict["done"] if p not in ALL_PHASES]
        if unknown:
            raise ValueError(f"GDRQCallback checkpoint names unknown phases {unknown}")
        self.done = list(state_dict["done"])
        self.phase_metrics = dict(state_dict.get("phase_metrics", {}))


def _typed(name: str, cls: type, value: Any) -> Any:
    """``value`` as ``cls`` (``None``: the default, a dict: its fields); anything else is a ``TypeError``."""
    value = cls() if value is None else cls(**value) if isinstance(value, dict) else value
    if not isinstance(value, cls):
        raise TypeError(f"GDRQCallback({name}=...) needs a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    return value
