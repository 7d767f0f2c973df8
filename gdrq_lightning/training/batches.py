"""Passes over training batches that the schedule runs between training steps.

Batches come from a fresh iterator over the trainer's training data (a loader with
persistent workers would otherwise be reset under the running epoch), prepared as
Lightning's training loop prepares them (precision, batch-transfer hooks, device). Under
DDP every rank reads the same number of batches of its own shard.
"""
from __future__ import annotations

from contextlib import contextmanager
from itertools import islice
from typing import Any, Iterator

import pytorch_lightning as pl
from torch import nn
from torch.utils.data import DataLoader, IterableDataset


def _fresh_loader(loader: Any) -> Any:
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()))
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
        return loader
    return DataLoader(
        loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
        num_workers=loader.num_workers, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
    )


def training_batches(trainer: pl.Trainer, n: int) -> Iterator[Any]:
    """Up to ``n`` training batches as a training step receives them: on the module's device,
    in the precision's input dtype, inside its forward context (autocast for ``*-mixed``)."""
    loader = trainer.train_dataloader
    if loader is None or n <= 0:
        return
    precision, module = trainer.precision_plugin, trainer.lightning_module
    for batch in islice(_fresh_loader(loader), n):  # what Lightning's training loop does to a batch
        batch = module._on_before_batch_transfer(precision.convert_input(batch), dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        with precision.forward_context():
            yield batch


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag afterwards (frozen BatchNorms stay frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
