"""The ``deploy`` phase: the callback puts the network into the exported form (docs/methods.md#deploy-form)
and training goes on in it; checkpoints before, at and after the phase load, a run resumes inside it,
and validating a deploy-form checkpoint needs no data to link it up again."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.testing import assert_close

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
from gdrq_lightning.export import is_deployed

SCHEDULE = Schedule(scale_clip="step:0", quant_weights="step:0", quant_acts="step:1", groups="step:1",
                    freeze_bn="step:2", deploy="step:4")


def config() -> QuantConfig:
    return QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=2)


class Seen(pl.Callback):
    """Per training batch: whether the network was in deploy form; the loss of each step."""

    def __init__(self) -> None:
        self.deployed: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.deployed.append(is_deployed(pl_module.model))


def test_deploy_phase_trains_on_in_the_exported_form_and_resumes_inside_it(
    tmp_path: Path, make_trainer, make_module, no_plots
) -> None:
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    gdrq, seen = GDRQCallback(config(), SCHEDULE, calib_batches=2, bn_recalib_batches=2), Seen()
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    make_trainer([gdrq, every_step, seen], max_steps=8, max_epochs=-1, limit_train_batches=2,
                 enable_checkpointing=True).fit(module)
    assert gdrq.done[-1] == "deploy" and seen.deployed == [False] * 4 + [True] * 4
    assert not any(m.training for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    ckpts = {s: torch.load(tmp_path / f"step={s}.ckpt", weights_only=True) for s in (3, 4, 5, 8)}
    assert all(list(c["state_dict"]) == list(ckpts[3]["state_dict"]) for c in ckpts.values())  # same keys in every phase
    moved = module.state_dict()["model.3.weight"] - ckpts[5]["state_dict"]["model.3.weight"]
    assert moved.abs().sum() > 0  # the weights kept training in deploy form
    assert not torch.equal(before["model.3.weight"], module.state_dict()["model.3.weight"])

    # resume inside the phase (at an epoch's end, where the batches line up): same form, same tensors
    second, seen2 = GDRQCallback(config(), SCHEDULE, calib_batches=2, bn_recalib_batches=2), Seen()
    resumed = make_module()
    make_trainer([second, seen2], max_steps=8, max_epochs=-1, limit_train_batches=2).fit(
        resumed, ckpt_path=tmp_path / "step=6.ckpt")
    assert second.done == gdrq.done and seen2.deployed == [True, True]
    for key, value in module.state_dict().items():  # ends where the uninterrupted run ended
        assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("step", [3, 5])
def test_validating_a_checkpoint_before_or_in_the_phase(tmp_path: Path, make_trainer, make_module, no_plots, step: int) -> None:
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    make_trainer([GDRQCallback(config(), SCHEDULE, calib_batches=2, bn_recalib_batches=2), every_step], max_steps=5,
                 max_epochs=-1, limit_train_batches=4, enable_checkpointing=True).fit(make_module())
    module = make_module()
    make_trainer([GDRQCallback(config(), SCHEDULE)], limit_val_batches=1).validate(
        module, ckpt_path=tmp_path / f"step={step}.ckpt", verbose=False)
    assert is_deployed(module.model) == (step == 5)


def test_deploy_needs_the_quantized_network_in_the_schedule() -> None:
    with pytest.raises(ValueError, match="Schedule.deploy=.*quant_acts is skipped"):
        Schedule(quant_acts=None, deploy=3)
