"""The ``gdrq`` command's checkpoints: ``last.ckpt`` plus the best of the final phase, no copies.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` as a second full copy of
the top-k file saved at the same step (90-150 MB each for a ResNet), and its
``save_last="link"`` links ``last.ckpt`` to the latest *top-k* file even when that is older
than the last step. :class:`RunCheckpoint` links ``last.ckpt`` to a top-k file only when that
file was written at this very step, and saves it as a file of its own otherwise.

The best is judged by the :class:`~gdrq_lightning.GDRQCallback`'s ``summary_metric`` (without
one, only ``last.ckpt`` is kept) and only within the current quantization phase: a float
network of the warm-up must not stay "best" once the network is quantized, so a new phase
drops the previous phase's best files.
"""
from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor

from .callback import GDRQCallback


def _schedule(trainer: pl.Trainer) -> GDRQCallback | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, GDRQCallback)), None)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose default monitor is the ``GDRQCallback.summary_metric``
    (``min`` for a metric named ``*loss*``, else ``max``), whose top-k holds checkpoints of the
    current phase only, and whose ``last.ckpt`` is never a byte-for-byte copy of another file
    (a relative symbolic link when it would be; a copy only where links are not allowed).
    Takes ``ModelCheckpoint``'s arguments."""

    best_phase: str | None = None
    _last_written_step: int = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        schedule = _schedule(trainer)
        if self.monitor is None:
            metric = schedule.summary_metric if schedule is not None else None
            if metric:
                self.monitor, self.mode = metric, "min" if "loss" in metric else "max"
                self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
            else:
                self.save_top_k = 0  # nothing to judge "best" by: last.ckpt alone
        super().setup(trainer, pl_module, stage)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        schedule = _schedule(trainer)
        phase = schedule.phase if schedule is not None else None
        if self.monitor and phase != self.best_phase:
            if self.best_phase is not None:
                self._forget_best(trainer)
            self.best_phase = phase
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _forget_best(self, trainer: pl.Trainer) -> None:
        """A new phase: the earlier phase's best files go, its scores no longer count."""
        for path in list(self.best_k_models):
            self._remove_checkpoint(trainer, path)
        self.best_k_models, self.kth_best_model_path, self.best_model_path = {}, "", ""
        self.best_model_score = None
        self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    def _ensure_last(self, trainer: pl.Trainer) -> None:
        """``last.ckpt`` at every save point: Lightning (>= 2.5) writes it only at steps where a
        top-k file was saved, which leaves an epoch that did not improve without its state."""
        if (self.save_last and not trainer.fast_dev_run and trainer.state.fn == "fit" and not trainer.sanity_checking
                and self._last_written_step != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if not self.save_last:
            return
        self._last_written_step = trainer.global_step
        path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        written_now = self._last_checkpoint_saved if self._last_global_step_saved == trainer.global_step else ""
        self.last_model_path = path
        if written_now and os.path.abspath(written_now) != os.path.abspath(path):
            self._link_checkpoint(trainer, written_now, path)
            return
        if trainer.is_global_zero and os.path.islink(path):
            os.remove(path)  # a link to an earlier best: write this step's state, not through the link
        self._save_checkpoint(trainer, path)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_phase": self.best_phase}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_phase = state_dict.get("best_phase")
