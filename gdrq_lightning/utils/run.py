"""The run folder and what goes to the run's loggers, rank zero only.

One definition of "where a run's files go", used by the ``gdrq`` command (checkpoints,
``config.yaml``, logger files), the callbacks (plots, interrupt checkpoints) and the tasks
(validation pictures, prediction files), so it depends on nothing else of the library.
"""
from __future__ import annotations

import os

from pytorch_lightning import Callback, Trainer
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor


class RunFolder(Callback):
    """Names the run folder of a trainer: everything of the run goes under ``path``.

    The ``gdrq`` command adds one to every trainer (``runs/<task>/<config name>/``, or the
    folder of the checkpoint a ``test`` / ``predict`` reads); in Python, add
    ``RunFolder("runs/my_run")`` to the callbacks to get the same layout. Without one,
    :func:`run_dir` falls back to the logger's directory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = str(path)


def run_dir(trainer: Trainer) -> str:
    """The run folder: a :class:`RunFolder` callback's path; else the logger's own directory
    (W&B: ``save_dir/project/run id``; CSV / TensorBoard: their ``log_dir``); else the
    trainer's ``default_root_dir``."""
    marker = next((cb for cb in trainer.callbacks if isinstance(cb, RunFolder)), None)
    if marker is not None:
        return marker.path
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
