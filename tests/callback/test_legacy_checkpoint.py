"""A checkpoint written before the callback was split into its jobs (commit 568e5bd, the files in ``fixtures/``,
made by that commit's code with this directory's ``TinyModule``) still resumes: the
phases, every quantizer tensor and the frozen BatchNorms come back, and training goes on."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule

DATA = Path(__file__).parent / "fixtures"
SCHEDULE = Schedule(scale_clip="step:1", quant_weights="step:2", quant_acts="step:3", groups="step:3",
                    freeze_bn="step:4", unit="step")
PHASES = ["scale_clip", "quant_weights", "quant_acts", "groups", "freeze_bn"]


class Probe(pl.Callback):
    """The state the resumed run starts from."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.bn_training = any(m.training for m in pl_module.modules() if isinstance(m, _BatchNorm))


@pytest.mark.parametrize("method, groups", [("gdrq", 4), ("pact", 1)])
def test_a_checkpoint_of_the_unsplit_callback_resumes(make_trainer, make_module, no_plots, method: str, groups: int) -> None:
    path = DATA / f"legacy_568e5bd_{method}.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    gdrq = GDRQCallback(QuantConfig(method=method, weight_bits=4, act_bits=4, groups=groups), SCHEDULE,
                        summary_metric="val/acc", calib_batches=2, bn_recalib_batches=2)
    probe = Probe()
    trainer = make_trainer([gdrq, probe], max_steps=7, max_epochs=-1, limit_train_batches=4)
    trainer.fit(make_module(), ckpt_path=str(path))

    assert gdrq.done == PHASES
    assert probe.step == saved["global_step"] == 5
    for key, value in saved["state_dict"].items():  # what the resumed run started from: the old file's tensors
        assert_close(probe.state[key], value, rtol=0, atol=0, msg=key)
    assert not probe.bn_training  # freeze_bn came back with the phases
    assert trainer.global_step == 7
    assert gdrq.phase_metrics == saved["callbacks"][next(k for k in saved["callbacks"] if k.startswith("GDRQ"))]["phase_metrics"]
