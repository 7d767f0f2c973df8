"""fit -> checkpoint -> resume: the phase and every quantizer tensor come back, checkpoint
keys never change between phases, and a resumed run equals an uninterrupted one (docs/methods.md#schedule)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.testing import assert_close

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
from gdrq_lightning.quant import named_quantizers

SCHEDULE = Schedule(scale_clip="step:1", quant_weights="step:2", quant_acts="step:5", groups="step:5", freeze_bn=None)


def quant_config(method: str) -> QuantConfig:
    return QuantConfig(method=method, weight_bits=4, act_bits=4, groups=4 if method == "gdrq" else 1)


def quantizer_entries(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state_dict.items() if "quantizer" in k}


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class RestoreProbe(pl.Callback):
    """What the resumed run starts from: the callback's phase, quantizer tensors and switch mirrors."""

    def __init__(self, gdrq: GDRQCallback) -> None:
        self.gdrq = gdrq

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.done = list(self.gdrq.done)
        self.global_step = trainer.global_step
        self.state = quantizer_entries(pl_module.state_dict())
        self.mirrors = {(n, s): q.is_on(s) for n, q in named_quantizers(pl_module.model) for s in q.switch_names}


@pytest.mark.parametrize("method", ["gdrq", "pact", "lsq"])
def test_resume_continues_in_the_same_phase_with_identical_quantizer_state(
    tmp_path: Path, make_trainer, make_module, no_plots, method: str
) -> None:
    every_step = ModelCheckpoint(dirpath=tmp_path / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    first = GDRQCallback(quant_config(method), SCHEDULE)
    trainer = make_trainer([first, every_step], max_steps=4, max_epochs=-1, limit_train_batches=2, enable_checkpointing=True)
    trainer.fit(make_module())
    assert first.done == ["scale_clip", "quant_weights"]  # quant_acts (step 5) has not begun
    # resume from ModelCheckpoint's file: from one that `trainer.save_checkpoint` wrote after `fit`
    # stopped at max_steps, Lightning 2.6 moves on to a new epoch after one batch, so the batches
    # would not line up with the uninterrupted run compared below
    mid = tmp_path / "steps" / "step=4.ckpt"

    # checkpoints of the fp, scale_clip and quant_weights phases have the same keys
    ckpts = {int(p.stem.split("=")[1]): load(p) for p in (tmp_path / "steps").glob("step=*.ckpt")}
    assert sorted(ckpts) == [1, 2, 3, 4]
    dones = {s: c["callbacks"]["GDRQCallback"]["done"] for s, c in ckpts.items()}
    assert dones == {1: [], 2: ["scale_clip"], 3: ["scale_clip", "quant_weights"], 4: ["scale_clip", "quant_weights"]}
    keys = [list(c["state_dict"]) for c in ckpts.values()]
    assert all(k == keys[0] for k in keys)
    assert any(k.endswith("weight_quantizer.quant_on") for k in keys[0])
    assert not bool(ckpts[1]["state_dict"]["model.3.weight_quantizer.clip_on"])
    saved = load(mid)
    assert saved["callbacks"]["GDRQCallback"]["done"] == ["scale_clip", "quant_weights"]
    assert saved["callbacks"]["GDRQCallback"]["module"] == f"{type(make_module()).__module__}.TinyModule"
    sd = saved["state_dict"]
    assert list(sd) == keys[0]
    assert bool(sd["model.3.weight_quantizer.clip_on"]) and bool(sd["model.3.weight_quantizer.quant_on"])
    assert not bool(sd["model.2.act_quantizer.quant_on"]) and not bool(sd["model.3.weight_quantizer.groups_on"])

    # a NEW module and a NEW callback resume from it
    second = GDRQCallback(quant_config(method), SCHEDULE)
    probe = RestoreProbe(second)
    resumed = make_module()
    make_trainer([second, probe], max_steps=6, max_epochs=-1, limit_train_batches=2).fit(resumed, ckpt_path=mid)
    assert probe.global_step == 4 and probe.done == ["scale_clip", "quant_weights"]
    expected = quantizer_entries(sd)
    assert list(probe.state) == list(expected)
    for key, value in expected.items():
        assert_close(probe.state[key], value, atol=0, rtol=0, msg=key)
    assert all(probe.mirrors[(n, s)] == bool(expected[f"model.{n}.{s}"]) for n, s in probe.mirrors)
    assert second.done == ["scale_clip", "quant_weights", "quant_acts", "groups"]

    # ... and end exactly where an uninterrupted run ends
    straight = make_module()
    make_trainer([GDRQCallback(quant_config(method), SCHEDULE)], max_steps=6, max_epochs=-1, limit_train_batches=2).fit(straight)
    for (key, a), (key_b, b) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        assert key == key_b
        assert_close(a, b, atol=0, rtol=0, msg=key)


def test_validate_from_a_checkpoint_restores_the_phase(tmp_path: Path, make_trainer, make_module, no_plots) -> None:
    trainer = make_trainer([GDRQCallback(quant_config("gdrq"), SCHEDULE)], max_steps=3, max_epochs=-1, limit_train_batches=2)
    trainer.fit(make_module())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    module = make_module()
    gdrq = GDRQCallback(quant_config("gdrq"), SCHEDULE)
    make_trainer([gdrq], limit_val_batches=1).validate(module, ckpt_path=tmp_path / "mid.ckpt", verbose=False)
    assert gdrq.done == ["scale_clip", "quant_weights"]
    w, a = module.model[3].weight_quantizer, module.model[2].act_quantizer
    assert (w.is_on("clip_on"), w.is_on("quant_on"), w.is_on("groups_on"), a.is_on("quant_on")) == (True, True, False, False)


def test_a_second_fit_with_the_same_callback_continues_in_its_phase(make_trainer, make_module, no_plots) -> None:
    gdrq = GDRQCallback(quant_config("gdrq"), Schedule(quant_acts="step:100", groups=None))
    module = make_module()
    make_trainer([gdrq], max_epochs=1, limit_train_batches=1).fit(module)
    seen: list[tuple[bool, bool]] = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            q = pl_module.model[3].weight_quantizer
            seen.append((q.is_on("clip_on"), q.is_on("quant_on")))

    make_trainer([gdrq, Probe()], max_epochs=1, limit_train_batches=1).fit(module)
    assert gdrq.done == ["scale_clip", "quant_weights"] and seen == [(True, True)]


def test_resumed_run_keeps_batchnorm_frozen(tmp_path: Path, make_trainer, make_module, no_plots) -> None:
    schedule = Schedule(scale_clip=0, quant_weights=0, quant_acts=0, groups=0, freeze_bn="step:1")
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    first = make_trainer([GDRQCallback(quant_config("gdrq"), schedule), every_step], max_steps=2, max_epochs=-1, enable_checkpointing=True)
    first.fit(make_module())
    modes: list[set[bool]] = []

    class BNModes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            modes.append({m.training for m in pl_module.modules() if isinstance(m, torch.nn.BatchNorm2d)})

    gdrq = GDRQCallback(quant_config("gdrq"), schedule)
    make_trainer([gdrq, BNModes()], max_steps=4, max_epochs=-1).fit(make_module(), ckpt_path=tmp_path / "step=2.ckpt")
    assert gdrq.done[-1] == "freeze_bn" and modes == [{False}, {False}]
