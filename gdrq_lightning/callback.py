"""``GDRQCallback``: swaps every target layer at ``setup`` (also in the ``fp`` phase, so checkpoint
keys never change and the optimizer sees every quantizer parameter) and orchestrates the phase
schedule (docs/methods.md#schedule). Each job it runs lives in :mod:`gdrq_lightning.training`
(phases, calibration, BatchNorm re-estimation, guards, deploy form, bit plans) or
:mod:`gdrq_lightning.quant.distributed` (DDP statistics); its own state is the phases that have run."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from .mixed import BitPlan, apply_plan, with_plan
from .quant import QuantConfig, calibrate_weights, quantize_model, quantized_layers
from .quant.distributed import sync_statistics
from .schedule import ALL_PHASES, Schedule
from .task import quant_network, resolve_config
from .training.bits import AutoBits, plan_and_apply
from .training.deploy import begin_deploy, link_deploy
from .training.guards import check_quantizers_finite, project_weights
from .training.options import as_instance, check_counts, check_state
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
        auto_bits: plan one weight bit width per layer when the first phase begins, under a budget
            (:class:`~gdrq_lightning.training.bits.AutoBits`, e.g. ``{budget: {avg_weight_bits: 3}}``).

    Example:
        >>> cb = GDRQCallback(QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4),
        ...                   Schedule(scale_clip=1, quant_weights=2, quant_acts=3, groups=4, freeze_bn=5))
    """

    def __init__(
        self, config: QuantConfig | None = None, schedule: Schedule | None = None, *, summary_metric: str | None = None,
        calib_batches: int = 16, bn_recalib_batches: int = 50, k_w_every_n_steps: int | None = None,
        auto_bits: AutoBits | None = None,
    ) -> None:
        super().__init__()
        self.config = as_instance("GDRQCallback", "config", QuantConfig, config)
        self.schedule = as_instance("GDRQCallback", "schedule", Schedule, schedule)
        check_counts("GDRQCallback", calib_batches=(calib_batches, 0), bn_recalib_batches=(bn_recalib_batches, 0),
                     k_w_every_n_steps=(k_w_every_n_steps, 1))
        self.summary_metric, self.calib_batches = summary_metric, calib_batches
        self.bn_recalib_batches, self.k_w_every_n_steps = bn_recalib_batches, k_w_every_n_steps
        self.auto_bits, self.bit_plan = AutoBits.parse(auto_bits), None
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
        if self.auto_bits and self.bit_plan is None and self.schedule.due(trainer.current_epoch, trainer.global_step):
            config = resolve_config(self.config, pl_module)
            self._use_plan(plan_and_apply(trainer, pl_module, self._target, config, self.auto_bits))
        begin_due_phases(self.schedule, self.done, trainer, pl_module, self._target, calib_batches=self.calib_batches,
                         bn_recalib_batches=self.bn_recalib_batches, prepare={"deploy": self._deploy})

    def _deploy(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module) -> None:
        begin_deploy(trainer, pl_module, network, self.calib_batches)
        self._linked = True

    def _use_plan(self, plan: BitPlan) -> None:
        """Keep the plan; the config a checkpoint stores then rebuilds the planned bits (export)."""
        self.bit_plan, self.config = plan, with_plan(self.config, plan)

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
                "config": self.config.to_dict(), "module": self._module_class,
                "bit_plan": None if self.bit_plan is None else self.bit_plan.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state(state_dict, STATE_VERSION, ALL_PHASES)
        self.done = list(state_dict["done"])
        self.phase_metrics = dict(state_dict.get("phase_metrics", {}))
        if state_dict.get("bit_plan") is not None:  # a resumed run keeps its planned bits (their state is loaded)
            self._use_plan(BitPlan.from_dict(state_dict["bit_plan"]))
            apply_plan(self._target, self.bit_plan, reinit=False)

