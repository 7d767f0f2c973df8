"""Interruption writes a resumable checkpoint; NaN quantizer state stops training by name."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import pytorch_lightning as pl
import torch

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
from gdrq_lightning.training.guards import check_quantizers_finite
from gdrq_lightning.interrupt import InterruptCheckpoint
from tasks.classification import ClassificationModule, DigitsDataModule

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint
    from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
    from gdrq_lightning.interrupt import InterruptCheckpoint
    from tasks.classification import ClassificationModule, DigitsDataModule

    class KillAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 2:
                os.kill(os.getpid(), signal.SIGTERM)   # a real signal, mid-epoch

    root = sys.argv[1]
    pl.seed_everything(0)
    cb = GDRQCallback(QuantConfig(method="gdrq", groups=4), Schedule(scale_clip=0, quant_weights=1, quant_acts="step:6", groups=2))
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=5, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[cb, KillAt(), ModelCheckpoint(dirpath=root, save_last=True), InterruptCheckpoint()])
    trainer.fit(ClassificationModule("resnet18", num_classes=10), DigitsDataModule(image_size=16, batch_size=8))
    """
)


def _quant_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "quantizer" in k}


def test_sigterm_mid_epoch_saves_resumable_checkpoint(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    path = tmp_path / "interrupted.ckpt"
    assert path.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "interrupted at epoch 1, step 8" in proc.stdout + proc.stderr
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 8  # the batch in flight finishes first
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("GDRQCallback"))
    assert state["done"] == ["scale_clip", "quant_weights", "quant_acts"]  # quant_acts began at step 6

    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(epoch=trainer.current_epoch, step=trainer.global_step, done=list(cb.done), buffers=_quant_buffers(pl_module))
            raise KeyboardInterrupt  # stop right after the restore; nothing more is needed

    cb = GDRQCallback(QuantConfig(method="gdrq", groups=4), Schedule(scale_clip=0, quant_weights=1, quant_acts="step:6", groups=2))
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=5, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[cb, Probe()],
                         default_root_dir=tmp_path / "resumed")
    with pytest.raises(SystemExit):
        trainer.fit(ClassificationModule("resnet18", num_classes=10), DigitsDataModule(image_size=16, batch_size=8), ckpt_path=str(path))
    assert seen["epoch"] == 1 and seen["step"] == 8
    assert seen["done"] == state["done"]
    saved = {k: v for k, v in ckpt["state_dict"].items() if "quantizer" in k}
    assert saved.keys() == seen["buffers"].keys()
    for k, v in saved.items():
        torch.testing.assert_close(seen["buffers"][k], v, atol=0, rtol=0)


def test_non_finite_quantizer_state_stops_with_layer_name(tmp_path):
    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                pl_module.model.layer2[0].relu.act_quantizer.running_abs_mean.fill_(float("nan"))

    cb = GDRQCallback(QuantConfig(method="gdrq"), Schedule())
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb, Poison(), ckpt, InterruptCheckpoint(dirpath=str(tmp_path))],
                         default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"layer2\.0\.relu\.act_quantizer\.running_abs_mean"):
        trainer.fit(ClassificationModule("resnet18", num_classes=10), DigitsDataModule(image_size=16, batch_size=8))
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0  # the good checkpoint from before the failure is kept
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "interrupted.ckpt").exists()


def test_check_quantizers_finite_passes_on_healthy_model():
    from gdrq_lightning import quantize_model
    import torchvision

    model = quantize_model(torchvision.models.resnet18(num_classes=10), QuantConfig(method="pact"))
    check_quantizers_finite(model, 0)
    model.layer1[0].relu.act_quantizer.alpha.data.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="layer1.0.relu.act_quantizer.alpha"):
        check_quantizers_finite(model, 5)


def test_interrupt_under_ddp_saves_on_rank_zero_without_a_barrier(tmp_path, monkeypatch):
    """A signal that reaches one node must not leave it waiting in a barrier: rank 0 writes the
    file alone, other ranks write nothing, and no collective is entered."""
    from types import SimpleNamespace

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    written: list[str] = []

    def trainer(rank_zero: bool) -> SimpleNamespace:
        def barrier(*_a, **_k):
            raise AssertionError("InterruptCheckpoint entered a barrier")

        io = SimpleNamespace(save_checkpoint=lambda ckpt, path: written.append(path))
        return SimpleNamespace(
            is_global_zero=rank_zero, state=SimpleNamespace(fn="fit"), checkpoint_callback=None, current_epoch=1,
            global_step=8, strategy=SimpleNamespace(checkpoint_io=io, barrier=barrier),
            save_checkpoint=lambda *a, **k: barrier(),
            _checkpoint_connector=SimpleNamespace(dump_checkpoint=lambda: {"epoch": 1}),
            callbacks=[], logger=None, default_root_dir=str(tmp_path),  # the run folder of the resume hint
        )

    cb = InterruptCheckpoint(dirpath=str(tmp_path))
    cb.on_exception(trainer(False), None, SIGTERMException())
    assert written == []
    cb.on_exception(trainer(True), None, KeyboardInterrupt())
    assert written == [str(tmp_path / "interrupted.ckpt")]


def test_the_resume_hint_is_a_command_with_the_runs_own_config(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from gdrq_lightning.interrupt import resume_hint
    from gdrq_lightning.utils.run import RunFolder

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "classification" / "digits gdrq"  # a space: the command quotes it
    run.mkdir(parents=True)
    trainer = SimpleNamespace(callbacks=[RunFolder(str(run))], logger=None, default_root_dir=str(tmp_path))
    ckpt = str(run / "interrupted.ckpt")
    assert resume_hint(trainer, ckpt) == f"resume with ckpt_path={ckpt!r} (Trainer.fit) or --ckpt_path on the command line"
    (run / "config.yaml").write_text("seed_everything: 0\n")  # what `gdrq fit` saves in the run folder
    assert resume_hint(trainer, ckpt) == ("resume with: gdrq fit --config 'runs/classification/digits gdrq/config.yaml' "
                                          "--ckpt_path 'runs/classification/digits gdrq/interrupted.ckpt'")


def test_epoch_line_after_a_mid_epoch_resume_counts_the_epochs_steps(tmp_path, capsys):
    """Lightning skips ``on_train_epoch_start`` for the epoch a run resumes in; the line must
    still count that epoch's steps (5), not every step since the start of training."""
    from gdrq_lightning.progress import LineProgressBar

    class StopAt(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 2:
                raise KeyboardInterrupt  # Ctrl+C, mid-epoch

    def trainer(epochs: int, *extra: pl.Callback) -> pl.Trainer:
        return pl.Trainer(max_epochs=epochs, limit_train_batches=5, limit_val_batches=0, logger=False, enable_model_summary=False,
                          default_root_dir=tmp_path,
                          callbacks=[LineProgressBar(), InterruptCheckpoint(dirpath=str(tmp_path)), *extra])

    data = DigitsDataModule(image_size=16, batch_size=8)
    with pytest.raises(SystemExit):
        trainer(3, StopAt()).fit(ClassificationModule("resnet18", num_classes=10), data)
    capsys.readouterr()
    trainer(3).fit(ClassificationModule("resnet18", num_classes=10), data, ckpt_path=str(tmp_path / "interrupted.ckpt"))
    lines = [ln.split(",")[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("[epoch")]
    assert lines == ["[epoch 2/3] 5 steps (resumed at step 7)", "[epoch 3/3] 5 steps"]
