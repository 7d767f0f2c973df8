"""The run's directory and what goes to its loggers, rank zero only.

Used by the callbacks (phase changes, plots, interrupt checkpoints) and by the tasks
(validation pictures, prediction files), so it depends on nothing else of the library.
"""
from __future__ import annotations

import os

from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor


def run_dir(trainer: Trainer) -> str:
    """The run's own directory (where Lightning puts its checkpoints), or the trainer's root dir."""
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), str(logger.version))
    return (logger.log_dir if logger is not None else None) or trainer.default_root_dir


def log_metrics(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    """Send plain scalars to every logger of the trainer (rank zero only)."""
    if trainer.is_global_zero and metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def log_histograms(trainer: Trainer, tensors: dict[str, Tensor], step: int) -> None:
    """Weight histograms: ``wandb.Histogram`` for W&B, ``add_histogram`` for TensorBoard."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb  # only where W&B is the logger

            logger.experiment.log(
                {k: wandb.Histogram(v.detach().float().cpu().numpy().ravel()) for k, v in tensors.items()}
            )
        elif isinstance(logger, TensorBoardLogger):
            for k, v in tensors.items():
                logger.experiment.add_histogram(k, v.detach().float().cpu(), global_step=step)


def log_image(trainer: Trainer, key: str, path: str) -> None:
    """Attach a saved PNG to W&B (other loggers keep the file in the run directory)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[path])
