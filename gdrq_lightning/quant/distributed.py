"""Collectives of the quantizers under DDP: activation statistics and learned initialisations
must be identical on every rank, at the cost of as few collectives as possible.

Activation statistics are reduced once per training step for all layers together
(:func:`sync_statistics`, called by the callback after each batch): a quantizer records its
batch statistic, the EMA is updated after the step, so under DDP a forward pass quantizes
with the EMA of the batches *before* it (a one-step lag; on one device there is none).
The first batch of each quantizer is reduced at once, since there is no EMA to use yet.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .quantizers import ActQuantizer


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduce_(t: Tensor, how: str) -> Tensor:
    """All-reduce ``t`` in place: ``"mean"``, ``"sum"`` or ``"max"`` over ranks; a no-op on one process."""
    n = world_size()
    if n == 1:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM)
    if how == "mean":
        t /= n
    return t


@torch.no_grad()
def sync_statistics(model: nn.Module) -> int:
    """Reduce every pending activation statistic of ``model`` across ranks and apply it; one
    ``all_reduce`` per reduction kind (mean-based and max-based statistics), whatever the
    number of layers. Returns how many quantizers were updated."""
    pending: dict[str, list[tuple[ActQuantizer, Tensor]]] = {}
    for q in model.modules():
        if isinstance(q, ActQuantizer) and (found := q.pending_statistics()) is not None:
            stats, how = found
            pending.setdefault(how, []).append((q, stats))
    for how, entries in pending.items():
        flat = reduce_(torch.cat([s.reshape(-1) for _, s in entries]), how)
        for (q, stats), reduced in zip(entries, flat.split([s.numel() for _, s in entries])):
            q.apply_statistics(reduced.reshape(stats.shape))
    return sum(len(e) for e in pending.values())
