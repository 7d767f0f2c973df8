"""The ``deploy`` phase (docs/methods.md#deploy-form): the task's network becomes the integer graph
the export writes and trains on in that form; a checkpoint taken in it links up again on load."""
from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from ..export.deploy import network_inputs, restore_deploy, simulate_deploy
from ..task import quant_forward
from .batches import training_batches


def begin_deploy(trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module, batches: int) -> None:
    """:func:`simulate_deploy` on the network's inputs in ``batches`` training batches (the task's
    ``quant_forward`` maps a batch to them, e.g. a detection batch to its images); every rank
    runs it, and the ranks take rank 0's grids."""
    inputs = network_inputs(network, training_batches(trainer, max(batches, 1)), lambda b: quant_forward(pl_module, b))
    simulate_deploy(network, inputs)
    rank_zero_info(f"[gdrq] deploy form set up from {len(inputs)} batches: the network now computes what the exported "
                   f"file computes")


def link_deploy(network: nn.Module) -> bool:
    """A network whose deploy state came from a checkpoint: its folded BatchNorms linked again
    (nothing calibrated); ``False`` when it is not in deploy form."""
    return restore_deploy(network)
