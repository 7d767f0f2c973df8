"""A progress "bar" for logs: one line per epoch, for runs whose output is not a terminal.

Rich and tqdm redraw a line in place; written to a file (``nohup``, SLURM, CI) that is
either nothing until the end (Rich) or megabytes of carriage returns (tqdm). A long
run left alone needs a line per epoch that says how far it got and how it is doing.
"""
from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress import ProgressBar
from pytorch_lightning.utilities import rank_zero_only


class LineProgressBar(ProgressBar):
    """Prints ``[epoch 3/10] 45 steps, 61.2 s | train/loss 0.123 | val/acc1 0.972`` at
    the end of each training epoch (the metrics logged with ``prog_bar=True``), and one
    line per validate/test run."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._epoch_start = time.monotonic()
        self._epoch_first_step = 0
        self._resumed_at: int | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run resumed mid-epoch gets no ``on_train_epoch_start`` for that epoch: count its
        steps from where the epoch began (the restored step minus the steps it had done)."""
        self._epoch_start = time.monotonic()
        done = steps_done_in_epoch(trainer)
        self._epoch_first_step = trainer.global_step - done
        self._resumed_at = trainer.global_step if done else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.monotonic()
        self._epoch_first_step = trainer.global_step
        self._resumed_at = None

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        steps = trainer.global_step - self._epoch_first_step
        resumed = f" (resumed at step {self._resumed_at})" if self._resumed_at is not None else ""
        head = f"[epoch {trainer.current_epoch + 1}{total}] {steps} steps{resumed}, {time.monotonic() - self._epoch_start:.1f} s"
        self._print(head, self.get_metrics(trainer, pl_module))

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.state.fn == "validate":
            self._print("[validate]", self.get_metrics(trainer, pl_module))

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            self._print("[test]", self.get_metrics(trainer, pl_module))

    @staticmethod
    def _print(head: str, metrics: dict) -> None:
        parts = [head] + [f"{k} {_fmt(v)}" for k, v in metrics.items() if k != "v_num"]
        print(" | ".join(parts), flush=True)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def steps_done_in_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps of the current epoch already done when training (re)starts: 0 for a fresh
    epoch, the steps before the interruption for a run resumed mid-epoch (Lightning's loop
    progress; 0 where a Lightning version keeps it elsewhere)."""
    try:
        progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.current
        return int(progress.completed)
    except AttributeError:
        return 0
