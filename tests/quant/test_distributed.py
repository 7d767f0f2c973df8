"""Quantizer collectives on two gloo processes (no Lightning): the same statistics as one
process on the same global batch, one all_reduce per step for all layers, equal LSQ steps."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from gdrq_lightning import QuantConfig, quantize_model, set_quant_state
from gdrq_lightning.quant.distributed import sync_statistics


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = quantize_model(torchvision.models.resnet18(num_classes=10), QuantConfig(method=method, groups=1, act_bits=4))
    set_quant_state(model, scale_clip=False, quant_weights=False, quant_acts=False, groups=False)  # stats only
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # per-sample activations: half batches on two ranks see what one full batch sees
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 32, 32, generator=g) * (1 + i) for i in range(3)]


def _stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_abs_mean", "running_max"))}


def _worker(rank: int, store: str, method: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = _model(method)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1]
    per_step = []
    with torch.no_grad():
        for x in _batches():
            before = len(calls)
            model(x[rank * 4 : (rank + 1) * 4])  # this rank's half of the global batch
            sync_statistics(model)
            per_step.append(len(calls) - before)
    dist.all_reduce = real
    lsq = quantize_model(torchvision.models.resnet18(num_classes=10), QuantConfig(method="lsq")).train()
    lsq(_batches()[0][rank * 4 : (rank + 1) * 4])
    steps = torch.cat([p.detach().reshape(-1) for n, p in lsq.named_parameters() if n.endswith("act_quantizer.step")])
    gathered = [torch.zeros_like(steps) for _ in range(2)]
    dist.all_gather(gathered, steps)
    if rank == 0:
        torch.save({"stats": _stats(model), "per_step": per_step, "lsq_equal": torch.equal(*gathered)}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["gdrq", "group"])
def test_two_ranks_match_one_process_on_the_same_global_batch(method: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), method, out), nprocs=2, join=True)
        result = torch.load(out, weights_only=True)
    single = _model(method)
    with torch.no_grad():
        for x in _batches():
            single(x)
    expected = _stats(single)
    assert list(result["stats"]) == list(expected) and len(expected) == 17
    for key, value in expected.items():
        # max of maxima is exact; the mean of two half-batch means is the mean up to rounding
        torch.testing.assert_close(result["stats"][key], value, atol=0 if method == "group" else 1e-6, rtol=1e-6, msg=key)
    # step 1 initialises each layer at once: its EMA and its k_a (auto) from that batch, 2 x 17
    # reductions; after that one collective per step for all layers
    assert result["per_step"] == [34, 1, 1]
    assert result["lsq_equal"]
