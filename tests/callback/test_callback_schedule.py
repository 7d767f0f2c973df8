"""``GDRQCallback`` in a real ``Trainer``: each phase begins at its epoch / global step,
nothing is on during ``fp``, skipped phases stay off, ``freeze_bn`` freezes BatchNorm."""
from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

from gdrq_lightning import GDRQCallback, QuantConfig, QuantMonitor, Schedule, quantized_layers
from gdrq_lightning.quant import dequantize_model
from gdrq_lightning.quant import named_quantizers
from gdrq_lightning.quant import WeightQuantizer
from gdrq_lightning.schedule import PHASES

GDRQ_W4A4 = QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4, k_a=4.0)  # a clip that binds on FIXED_X
FIXED_X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def switches(model: nn.Module) -> dict[str, set[bool]]:
    """Every quantizer switch, as ``{"w.clip_on": {values}, "a.quant_on": {values}, ...}``, read from the buffers."""
    out: dict[str, set[bool]] = {}
    for _, q in named_quantizers(model):
        kind = "w" if isinstance(q, WeightQuantizer) else "a"
        for name in q.switch_names:
            buffer = bool(getattr(q, name))
            assert buffer == q.is_on(name), f"buffer and mirror of {name} disagree"
            out.setdefault(f"{kind}.{name}", set()).add(buffer)
    return out


def expected_switches(done: list[str]) -> dict[str, set[bool]]:
    return {
        "w.clip_on": {"scale_clip" in done}, "a.clip_on": {"scale_clip" in done},
        "w.quant_on": {"quant_weights" in done}, "a.quant_on": {"quant_acts" in done},
        "w.groups_on": {"groups" in done},
    }


def float_output(model: nn.Module, x: Tensor) -> Tensor:
    return dequantize_model(copy.deepcopy(model)).eval()(x)


class Probe(pl.Callback):
    """Records, after the GDRQ callback has run its hooks, the phase and switches at each epoch and step."""

    def __init__(self, gdrq: GDRQCallback) -> None:
        self.gdrq = gdrq
        self.at_epoch: dict[int, dict[str, Any]] = {}
        self.at_step: dict[int, dict[str, Any]] = {}

    def snapshot(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        model = pl_module.model
        with torch.no_grad():
            out = copy.deepcopy(model).eval()(FIXED_X)
        return {
            "done": list(self.gdrq.done), "phase": self.gdrq.phase, "switches": switches(model),
            "bn_training": {m.training for m in model.modules() if isinstance(m, _BatchNorm)},
            "matches_float": torch.equal(out, float_output(model, FIXED_X)),
        }

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_epoch[trainer.current_epoch] = self.snapshot(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.at_step[trainer.global_step] = self.snapshot(pl_module)


def run(
    make_trainer, make_module, schedule: Schedule, config: QuantConfig = GDRQ_W4A4, **trainer_kwargs: Any
) -> tuple[GDRQCallback, Probe, pl.LightningModule]:
    gdrq = GDRQCallback(config, schedule)
    probe = Probe(gdrq)
    module = make_module()
    make_trainer([gdrq, probe, QuantMonitor()], **trainer_kwargs).fit(module)
    return gdrq, probe, module


def test_setup_swaps_every_target_layer_with_all_switches_off(make_trainer, make_module, no_plots) -> None:
    gdrq = GDRQCallback(GDRQ_W4A4, Schedule(scale_clip=5, quant_weights=5, quant_acts=5, groups=5))
    module = make_module()
    trainer = make_trainer([gdrq], max_epochs=1, limit_train_batches=1)
    trainer.fit(module)
    names = [n for n, _ in quantized_layers(module.model)]
    assert names == ["2", "3", "5", "6", "8"]  # convs 3 and 6, ReLUs 2, 5, 8; conv 0 and fc 11 stay float
    assert gdrq.done == [] and gdrq.phase == "fp"
    assert switches(module.model) == expected_switches([])
    assert no_plots == []


def test_phases_begin_at_their_epochs(make_trainer, make_module, no_plots) -> None:
    schedule = Schedule(scale_clip=1, quant_weights=2, quant_acts=3, groups=4, freeze_bn=5)
    gdrq, probe, module = run(make_trainer, make_module, schedule, max_epochs=7, limit_train_batches=2)
    assert sorted(probe.at_epoch) == list(range(7))
    for epoch, snap in probe.at_epoch.items():
        done = list(PHASES[:epoch])
        assert snap["done"] == done, epoch
        assert snap["switches"] == expected_switches(done), epoch
        assert snap["bn_training"] == {epoch < 5}, epoch
        assert snap["matches_float"] == (epoch == 0), epoch  # fp is exactly the float network
    for step, snap in probe.at_step.items():  # phases change only at epoch starts
        assert snap["done"] == list(PHASES[: step // 2]), step
    assert gdrq.done == list(PHASES) and gdrq.phase == "freeze_bn"
    # one plot per phase that changes a distribution: the first quantized conv's weights, the
    # activation after it (layer 5) at quant_acts; freeze_bn changes no distribution
    assert [p.rsplit("/", 1)[-1] for p in no_plots] == ["scale_clip_3.png", "quant_weights_3.png", "quant_acts_5.png",
                                                        "groups_3.png"]


def test_phases_begin_at_their_global_steps_across_epochs(make_trainer, make_module, no_plots) -> None:
    schedule = Schedule(scale_clip="step:1", quant_weights="step:2", quant_acts="step:4", groups="step:5", freeze_bn="step:7")
    gdrq, probe, _ = run(make_trainer, make_module, schedule, max_steps=8, max_epochs=-1, limit_train_batches=3)
    starts = {"scale_clip": 1, "quant_weights": 2, "quant_acts": 4, "groups": 5, "freeze_bn": 7}
    assert sorted(probe.at_step) == list(range(8))
    for step, snap in probe.at_step.items():
        done = [p for p in PHASES if starts[p] <= step]
        assert snap["done"] == done, step
        assert snap["switches"] == expected_switches(done), step
        assert snap["bn_training"] == {step < 7}, step
        assert snap["matches_float"] == (step == 0), step
    assert [probe.at_epoch[e]["done"] for e in (0, 1, 2)] == [[], ["scale_clip", "quant_weights"], list(PHASES[:4])]
    assert gdrq.done == list(PHASES)


def test_plain_integers_count_steps_with_unit_step(make_trainer, make_module, no_plots) -> None:
    schedule = Schedule(scale_clip=0, quant_weights=3, quant_acts=None, groups=None, freeze_bn=None, unit="step")
    gdrq, probe, _ = run(make_trainer, make_module, schedule, max_steps=4, max_epochs=-1, limit_train_batches=2)
    assert [probe.at_step[s]["done"] for s in range(4)] == [["scale_clip"]] * 3 + [["scale_clip", "quant_weights"]]


def test_skipped_phases_never_switch_on(make_trainer, make_module, no_plots) -> None:
    schedule = Schedule(scale_clip=None, quant_weights="step:1", quant_acts=None, groups=None, freeze_bn=None)
    gdrq, probe, module = run(make_trainer, make_module, schedule, max_epochs=2, limit_train_batches=2)
    assert gdrq.done == ["quant_weights"]
    assert switches(module.model) == {
        "w.clip_on": {False}, "a.clip_on": {False}, "w.quant_on": {True}, "a.quant_on": {False}, "w.groups_on": {False},
    }


def test_freeze_bn_stops_running_statistics_even_after_validation(make_trainer, make_module, no_plots) -> None:
    class BNWatch(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, bool, bool]] = []

        def stats(self, pl_module: pl.LightningModule) -> list[Tensor]:
            bns = [m for m in pl_module.modules() if isinstance(m, _BatchNorm)]
            return [t.clone() for m in bns for t in (m.running_mean, m.running_var, m.num_batches_tracked)]

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.training = {m.training for m in pl_module.modules() if isinstance(m, _BatchNorm)}
            self.before = self.stats(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            after = self.stats(pl_module)
            changed = [not torch.equal(a, b) for a, b in zip(self.before, after)]
            assert len(self.training) == 1
            self.rows.append((trainer.global_step - 1, self.training.pop(), any(changed)))

    schedule = Schedule(scale_clip=0, quant_weights=0, quant_acts=0, groups=0, freeze_bn="step:3")
    gdrq = GDRQCallback(GDRQ_W4A4, schedule)
    watch = BNWatch()
    # validation after every training batch puts the module back in train mode each time
    trainer = make_trainer([gdrq, watch], max_epochs=3, limit_train_batches=2, limit_val_batches=1, val_check_interval=1)
    trainer.fit(make_module())
    assert watch.rows == [(s, s < 3, s < 3) for s in range(6)]
    assert gdrq.done == list(PHASES)


def test_quantized_forward_differs_from_float_once_on(make_trainer, make_module, no_plots) -> None:
    gdrq, probe, module = run(make_trainer, make_module, Schedule(), max_epochs=1, limit_train_batches=2)
    model = module.model.eval()
    with torch.no_grad():
        quantized, reference = model(FIXED_X), float_output(model, FIXED_X)
    assert torch.isfinite(quantized).all()
    assert not torch.allclose(quantized, reference)
    assert_close(float_output(model, FIXED_X), reference, atol=0, rtol=0)  # the float copy is deterministic
