"""Under DDP (two gloo processes, no Lightning) every rank scores its own data shard, the scores
are summed over ranks, and both ranks get the same plan: the one a single process gets from the
union of the shards."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from gdrq_lightning import QuantConfig, quantize_model, set_quant_state
from gdrq_lightning.mixed import measure_sensitivity, plan_bits

CONFIG = QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=2)
BUDGET = {"avg_weight_bits": 3.0}


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))


def _shards() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=gen) * (1 + i), torch.randint(0, 10, (4,), generator=gen))
               for i in range(4)]
    return [batches[:2], batches[2:]]  # rank 0's shard, rank 1's shard: different data


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    network = quantize_model(_network(), CONFIG)  # as the callback holds it: swapped, quantizers off in fp
    set_quant_state(network, scale_clip=False, quant_weights=False, quant_acts=False, groups=False)
    plan = plan_bits(network, CONFIG, _shards()[rank], loss_fn, BUDGET)
    local = measure_sensitivity(_network(), CONFIG, _shards()[rank][:1], loss_fn, bits=(2,), method="mse")
    torch.save({"plan": plan.to_dict(), "mse_batches": local.batches}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_both_ranks_get_the_plan_of_the_union_of_their_shards() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.pt")
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert ranks[0]["plan"] == ranks[1]["plan"]  # same scores to the last bit, same plan
    single = measure_sensitivity(_network(), CONFIG, _shards()[0] + _shards()[1], loss_fn)
    plan = ranks[0]["plan"]
    assert plan["batches"] == 4 and ranks[0]["mse_batches"] == 0
    for name, row in single.scores.items():
        for bits, score in row.items():
            assert abs(plan["scores"][name][bits] - score) <= 1e-9 * max(abs(score), 1e-30), (name, bits)
    assert sum(plan["params"][n] * b for n, b in plan["weight_bits"].items()) <= 3.0 * sum(plan["params"].values())
    # the shards alone would plan differently: the agreement comes from the reduction
    alone = [measure_sensitivity(_network(), CONFIG, shard, loss_fn) for shard in _shards()]
    assert alone[0].scores != alone[1].scores
