"""BatchNorm statistics of the quantized network: re-estimated before ``freeze_bn`` and kept
frozen afterwards (docs/methods.md#schedule)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..quant import ActQuantizer
from ..quant.distributed import reduce_
from ..task import quant_forward
from .batches import modes_kept, training_batches


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
    with modes_kept(network):
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
    rank_zero_info(f"[gdrq] re-estimated {len(bns)} BatchNorms on the quantized network ({batches} batches)")
    return len(bns)


def keep_frozen(network: nn.Module, bn: bool, act_stats: bool) -> None:
    """Lightning puts the module in train mode each epoch: frozen parts go back to eval mode
    (BatchNorms normalise with, and stop updating, their running statistics; activation
    quantizers quantize with, and stop updating, their EMAs)."""
    frozen = (_BatchNorm,) * bn + (ActQuantizer,) * act_stats
    if frozen:
        for module in network.modules():
            if isinstance(module, frozen) and module.training:
                module.eval()
