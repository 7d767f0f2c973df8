"""The callback calibrates around its phases: k_a: auto from a pass over training batches,
BatchNorm statistics re-estimated on the quantized network before freeze_bn, activation
statistics frozen by freeze_act_stats."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
from gdrq_lightning.quant import ActQuantizer, calibrating_activations, set_quant_state

GDRQ = QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4)  # k_a: auto (the default)


class AtEpochStart(pl.Callback):
    """A copy of the network after the GDRQ callback's hooks at the start of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.model: nn.Module | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.model = copy.deepcopy(pl_module.model)


def loader_batches(module: pl.LightningModule, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [b for _, b in zip(range(n), module.train_dataloader())]


def test_k_a_auto_is_calibrated_from_the_float_network_when_scale_clip_begins(make_trainer, make_module, no_plots) -> None:
    probe_before, probe_after = AtEpochStart(0), AtEpochStart(1)
    gdrq = GDRQCallback(GDRQ, Schedule(scale_clip=1, quant_weights=1, quant_acts=2, groups=2), calib_batches=3)
    module = make_module()
    make_trainer([probe_before, gdrq, probe_after], max_epochs=2).fit(module)
    # what the pass sees: the network as it was before the phase switched on, in eval mode
    expected = copy.deepcopy(probe_after.model)
    set_quant_state(expected, scale_clip=False, quant_weights=False, quant_acts=False, groups=False)
    acts = [m for m in expected.modules() if isinstance(m, ActQuantizer)]
    for q in acts:
        q.k.fill_(4.0), q.k_calibrated.fill_(False)
    expected.eval()
    with torch.no_grad(), calibrating_activations(expected) as n:
        for x, _ in loader_batches(module, 3):
            expected(x)
    assert n == 3
    got = [m for m in probe_after.model.modules() if isinstance(m, ActQuantizer)]
    for q, e in zip(got, acts):
        assert bool(q.k_calibrated) and float(q.k) == float(e.k)
    assert len({float(q.k) for q in got}) == 3  # per layer


def test_numeric_k_a_is_never_recalibrated(make_trainer, make_module, no_plots) -> None:
    gdrq = GDRQCallback(QuantConfig(method="gdrq", k_a=5.0), Schedule(scale_clip=1, quant_weights=1, quant_acts=1, groups=1), calib_batches=2)
    module = make_module()
    make_trainer([gdrq], max_epochs=2).fit(module)
    assert {float(q.k) for q in module.model.modules() if isinstance(q, ActQuantizer)} == {5.0}


def bn_input_stats(model: nn.Module, batches: list[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN, the average over batches of its input's channel means and unbiased variances
    (what a cumulative running average records), with the quantizers as they are."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            def hook(_m, args, name=name) -> None:
                x = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)
                seen.setdefault(name, []).append((x.mean(1), x.var(1, unbiased=True)))
            hooks.append(bn.register_forward_pre_hook(hook))
    model.train()
    for q in model.modules():
        if isinstance(q, ActQuantizer):
            q.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {n: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0)) for n, v in seen.items()}


def test_bn_statistics_are_re_estimated_on_the_quantized_network_before_freezing(make_trainer, make_module, no_plots) -> None:
    probe = AtEpochStart(1)
    gdrq = GDRQCallback(GDRQ, Schedule(freeze_bn=1), bn_recalib_batches=3)
    module = make_module()
    make_trainer([gdrq, probe], max_epochs=2).fit(module)
    expected = bn_input_stats(copy.deepcopy(probe.model), loader_batches(module, 3))
    for name, bn in probe.model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            torch.testing.assert_close(bn.running_mean, expected[name][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(bn.running_var, expected[name][1], atol=1e-5, rtol=1e-5)
            assert bn.momentum == 0.1 and not bn.training  # restored, then frozen
    final = module.model.state_dict()
    for name, bn in probe.model.named_modules():  # frozen for the rest of training
        if isinstance(bn, nn.BatchNorm2d):
            torch.testing.assert_close(final[f"{name}.running_mean"], bn.running_mean, atol=0, rtol=0)


def test_bn_re_estimation_can_be_turned_off(make_trainer, make_module, no_plots) -> None:
    probe = AtEpochStart(1)

    class EndOfEpoch0(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 0:
                self.stats = {k: v.clone() for k, v in pl_module.model.state_dict().items() if "running" in k}

    end = EndOfEpoch0()
    gdrq = GDRQCallback(GDRQ, Schedule(freeze_bn=1), bn_recalib_batches=0)
    make_trainer([end, gdrq, probe], max_epochs=2).fit(make_module())
    after = probe.model.state_dict()
    for key, value in end.stats.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0)


def test_freeze_act_stats_stops_the_activation_emas(make_trainer, make_module, no_plots) -> None:
    probe = AtEpochStart(1)
    gdrq = GDRQCallback(GDRQ, Schedule(freeze_bn=None, freeze_act_stats=1))
    module = make_module()
    make_trainer([gdrq, probe], max_epochs=2).fit(module)
    assert gdrq.done[-1] == "freeze_act_stats"
    frozen = {k: v for k, v in probe.model.state_dict().items() if k.endswith("running_abs_mean")}
    final = module.model.state_dict()
    assert frozen and all(torch.equal(final[k], v) for k, v in frozen.items())
    assert all(not q.training for q in module.model.modules() if isinstance(q, ActQuantizer))


def test_calibration_options_are_validated() -> None:
    with pytest.raises(ValueError, match=r"calib_batches=-1\) must be an integer >= 0"):
        GDRQCallback(GDRQ, calib_batches=-1)
    with pytest.raises(ValueError, match=r"k_w_every_n_steps=0\) must be an integer >= 1"):
        GDRQCallback(GDRQ, k_w_every_n_steps=0)
