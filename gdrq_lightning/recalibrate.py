"""Passes over training batches that the schedule runs between training steps, without
gradients: calibrating ``auto`` activation clips (SPEC §2) and re-estimating BatchNorm
statistics of the quantized network before they are frozen.

Batches come from a fresh iterator over the trainer's training data (a loader with
persistent workers would otherwise be reset under the running epoch), prepared as
Lightning's training loop prepares them (precision, batch-transfer hooks, device), and
run through the task's
:meth:`~gdrq_lightning.task.QuantTask.quant_forward`. Under DDP every rank runs the same
number of batches of its own shard, and the results are reduced across ranks.
"""
from __future__ import annotations

from contextlib import contextmanager
from itertools import islice
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, IterableDataset

from .quant import ActQuantizer, calibrating_activations
from .quant.distributed import reduce_
from .task import quant_forward


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
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag afterwards (frozen BatchNorms stay frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def calibrate_activation_clips(trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module, batches: int) -> int:
    """Choose every ``k_a: auto`` factor from ``batches`` training batches of the float
    activations, network in eval mode (running BN statistics, EMAs untouched); returns how
    many activation quantizers were calibrated."""
    with _modes_kept(network):
        network.eval()
        with calibrating_activations(network) as n:
            if n:
                for batch in training_batches(trainer, batches):
                    quant_forward(pl_module, batch)
    return n


@torch.no_grad()
def reestimate_batchnorm(trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module, batches: int) -> int:
    """Recompute BatchNorm running statistics on ``batches`` training batches of the network as
    it now quantizes (quantizers on, their statistics untouched), averaged over the batches
    and then over DDP ranks, so statistics frozen next match the quantized network
    (NNCF's BN adaptation). Returns how many BatchNorms were re-estimated."""
    bns = [m for m in network.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    with _modes_kept(network):
        network.train()
        for q in network.modules():
            if isinstance(q, ActQuantizer):
                q.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the pass
        try:
            for batch in training_batches(trainer, batches):
                quant_forward(pl_module, batch)
        finally:
            for bn, momentum in zip(bns, momenta):
                bn.momentum = momentum
    stats = [t for bn in bns for t in (bn.running_mean, bn.running_var)]
    flat = reduce_(torch.cat([t.float().reshape(-1) for t in stats]), "mean")
    for t, v in zip(stats, flat.split([t.numel() for t in stats])):
        t.copy_(v.reshape(t.shape))
    return len(bns)
