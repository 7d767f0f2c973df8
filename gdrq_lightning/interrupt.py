"""Never lose work: a resumable checkpoint when a run is interrupted (Ctrl+C or SIGTERM).

Lightning turns SIGINT into ``KeyboardInterrupt`` and SIGTERM into ``SIGTERMException``
and calls ``on_exception``; this callback then writes ``interrupted.ckpt`` next to the
run's other checkpoints. Other errors (a NaN guard, a data error) do not overwrite
anything, so the last good checkpoint stays the one to resume from.

Under DDP rank 0 alone writes the file (the replicas hold the same weights), without
``Trainer.save_checkpoint``'s barrier: a signal that reaches one node only must not leave
that node waiting for ranks that never enter the barrier.
"""
from __future__ import annotations

import os
import shlex
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .utils.run import run_dir


class InterruptCheckpoint(Checkpoint):
    """Save ``<dirpath>/interrupted.ckpt`` on SIGINT / SIGTERM.

    Args:
        dirpath: where to write; default: the ``ModelCheckpoint`` directory, else
            ``<run dir>/checkpoints``.
        filename: file name without extension.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted") -> None:
        super().__init__()
        if not filename:
            raise ValueError("InterruptCheckpoint(filename=...) must not be empty")
        self.dirpath = dirpath
        self.filename = filename

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        dirpath = self.dirpath
        if dirpath is None:
            model_ckpt = trainer.checkpoint_callback
            dirpath = getattr(model_ckpt, "dirpath", None) or os.path.join(run_dir(trainer), "checkpoints")
        return os.path.join(dirpath, f"{self.filename}.ckpt")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != "fit":
            return
        if not trainer.is_global_zero:
            return
        path = self.checkpoint_path(trainer)
        trainer.strategy.checkpoint_io.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(), path)
        rank_zero_info(f"[gdrq] interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {path}; "
                       f"{resume_hint(trainer, path)}")

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "filename": self.filename}


def resume_hint(trainer: pl.Trainer, ckpt_path: str) -> str:
    """A command that can be pasted: the run's own resolved ``config.yaml`` (``gdrq fit`` saves it
    in the run folder) with this checkpoint; without one, the ``ckpt_path`` to pass to ``fit``."""
    config = os.path.join(run_dir(trainer), "config.yaml")
    if os.path.isfile(config):
        return f"resume with: gdrq fit --config {_short(config)} --ckpt_path {_short(ckpt_path)}"
    return f"resume with ckpt_path={ckpt_path!r} (Trainer.fit) or --ckpt_path on the command line"


def _short(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, shell-quoted."""
    rel = os.path.relpath(path)
    return shlex.quote(path if rel.startswith("..") else rel)
