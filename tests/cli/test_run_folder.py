"""One folder per run (issue 27): where ``gdrq`` commands write, which checkpoints a run keeps
(``last.ckpt`` and the best of the final phase, never two identical files), and a quiet
console (the known third-party notices hidden, the phase summary last)."""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
from gdrq_lightning.cli import main
from gdrq_lightning.run_checkpoint import RunCheckpoint
from gdrq_lightning.run_folder import (
    KEEP, RUN_FOLDER_ENV, default_logger_config, export_dir, fresh_folder, resolve_run_folder, run_logger, task_and_name,
)

REPO = Path(__file__).resolve().parents[2]
DIGITS_GDRQ = str(REPO / "configs" / "classification" / "digits_gdrq_w4a4.yaml")
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--data.image_size", "16", "--data.batch_size", "8", "--trainer.enable_model_summary", "false"]


def identical_files(folder: Path) -> list[tuple[str, str]]:
    """Pairs of regular files (links not counted: they take no space) with the same bytes."""
    seen: dict[str, str] = {}
    pairs = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.stat().st_size > 1024:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                pairs.append((seen[digest], str(path)))
            seen.setdefault(digest, str(path))
    return pairs


# -- the folder a command writes into --------------------------------------------------------
def test_task_and_name_from_the_config_path_or_the_model_class(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert task_and_name(["configs/classification/digits_gdrq_w4a4.yaml"], None) == ("classification", "digits_gdrq_w4a4")
    assert task_and_name(["mine.yaml"], "tasks.segmentation.SegmentationModule") == ("segmentation", "mine")
    assert task_and_name([str(tmp_path / "mine.yaml")], "tasks.detection.DetectionModule") == ("detection", "mine")
    assert task_and_name([], "tasks.classification.ClassificationModule") == ("classification", "run")
    # re-running a run folder's own resolved config names the same run
    assert task_and_name(["runs/classification/digits_version_2/config.yaml"], None) == ("classification", "digits")


def test_a_taken_folder_gets_the_next_version_suffix(tmp_path: Path) -> None:
    base = tmp_path / "runs" / "classification" / "digits"
    assert fresh_folder(base) == base
    base.mkdir(parents=True)
    assert fresh_folder(base) == base  # an empty folder is free
    (base / "config.yaml").write_text("x")
    assert fresh_folder(base) == base.with_name("digits_version_1")
    (base.with_name("digits_version_1") / "last.ckpt").parent.mkdir()
    (base.with_name("digits_version_1") / "last.ckpt").write_text("x")
    assert fresh_folder(base) == base.with_name("digits_version_2")


def test_which_folder_wins(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    common = {"config_paths": ["configs/classification/q.yaml"], "model_class": None}
    assert resolve_run_folder(**common, ckpt_path=None) == Path("runs/classification/q")
    assert resolve_run_folder(**common, ckpt_path="runs/classification/q/last.ckpt") == Path("runs/classification/q")
    assert resolve_run_folder(**common, ckpt_path="last") == Path("runs/classification/q")  # Lightning's keyword
    assert resolve_run_folder(**common, ckpt_path="a/last.ckpt", default_root_dir="root") == Path("root")
    assert resolve_run_folder(**common, ckpt_path="a/last.ckpt", default_root_dir="root", out="elsewhere") == Path("elsewhere")
    assert export_dir("runs/classification/q/last.ckpt") == Path("runs/classification/q/export")
    monkeypatch.setenv(RUN_FOLDER_ENV, "runs/classification/q_version_3")
    assert resolve_run_folder(**common, ckpt_path=None) == Path("runs/classification/q")  # rank 0 chooses
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_run_folder(**common, ckpt_path=None) == Path("runs/classification/q_version_3")  # a child rank reuses it


def test_loggers_write_into_the_run_folder(tmp_path: Path) -> None:
    default = default_logger_config()
    fit = run_logger("fit", default, tmp_path, "digits")
    assert isinstance(fit, WandbLogger) and fit.save_dir == str(tmp_path) and fit._wandb_init["name"] == "digits"
    assert "anonymous" not in fit._wandb_init  # wandb warns about the argument on every run
    test = run_logger("test", default, tmp_path, "digits")
    assert test.save_dir == str(tmp_path / "test") and test._wandb_init["name"] == "digits-test"
    assert run_logger("predict", default, tmp_path, "digits") is False  # predict logs nothing
    told = {"class_path": "pytorch_lightning.loggers.WandbLogger", "init_args": {"save_dir": "mine"}}
    assert run_logger("fit", told, tmp_path, "digits") is KEEP
    assert run_logger("fit", {"class_path": "pytorch_lightning.loggers.CSVLogger"}, tmp_path, "digits") is KEEP
    assert run_logger("fit", False, tmp_path, "digits") is KEEP


# -- checkpoints ---------------------------------------------------------------------------
SCORES = [0.9, 0.5, 0.7, 0.6, 0.7]  # val/acc1 by epoch; the float epoch 0 scores best overall


class Scripted(pl.LightningModule):
    """A tiny conv net whose validation reports the scripted ``val/acc1`` of its epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self.log("val/acc1", SCORES[self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(8, 3, 10, 10, generator=g), torch.randint(0, 2, (8,), generator=g)), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def listing(folder: Path) -> dict[str, str]:
    return {p.name: ("-> " + os.readlink(p)) if p.is_symlink() else "file" for p in folder.iterdir() if p.suffix == ".ckpt"}


def test_last_plus_the_best_of_the_final_phase_and_never_two_identical_files(tmp_path: Path) -> None:
    seen: list[dict[str, str]] = []

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch:
                seen.append(listing(tmp_path))
                assert identical_files(tmp_path) == []

    gdrq = GDRQCallback(QuantConfig(method="gdrq", weight_bits=4, act_bits=4), Schedule(scale_clip=1, quant_weights=None,
                        quant_acts=None, groups=None), summary_metric="val/acc1", calib_batches=0, bn_recalib_batches=0)
    ckpt = RunCheckpoint(dirpath=str(tmp_path), save_last=True, filename="best-{epoch}-{step}")
    trainer = pl.Trainer(max_epochs=len(SCORES), logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[gdrq, Snapshot(), ckpt], default_root_dir=tmp_path)
    trainer.fit(Scripted())
    seen.append(listing(tmp_path))
    assert (ckpt.monitor, ckpt.mode) == ("val/acc1", "max")  # from the GDRQCallback's summary_metric
    assert seen == [
        {"best-epoch=0-step=2.ckpt": "file", "last.ckpt": "-> best-epoch=0-step=2.ckpt"},
        {"best-epoch=1-step=4.ckpt": "file", "last.ckpt": "-> best-epoch=1-step=4.ckpt"},  # new phase: 0.5 is its best
        {"best-epoch=2-step=6.ckpt": "file", "last.ckpt": "-> best-epoch=2-step=6.ckpt"},
        {"best-epoch=2-step=6.ckpt": "file", "last.ckpt": "file"},  # 0.6: last is a state of its own
        {"best-epoch=2-step=6.ckpt": "file", "last.ckpt": "file"},  # 0.7 ties: the first stays the best
    ]
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (4, 10)  # the final state, also after epochs without a new best
    assert identical_files(tmp_path) == []


def test_without_a_summary_metric_only_last_is_kept(tmp_path: Path) -> None:
    ckpt = RunCheckpoint(dirpath=str(tmp_path), save_last=True, filename="best-{epoch}-{step}")
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[ckpt], default_root_dir=tmp_path)
    trainer.fit(Scripted())
    assert listing(tmp_path) == {"last.ckpt": "file"}
    assert torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4


# -- the command in process ------------------------------------------------------------------
def gdrq(args: list[str]) -> None:
    """``gdrq ARGS`` in this process, as the console script calls it."""
    with mock.patch.object(sys, "argv", ["gdrq", *args]):
        main()


class Lines(logging.Handler):
    """What Lightning's and torch's loggers print, after the filters the command installs."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


@pytest.fixture
def lines() -> Lines:
    handler = Lines()
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning_fabric", "torch")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def test_fit_then_test_and_predict_share_one_run_folder_and_say_little(tmp_path: Path, monkeypatch, capsys, lines) -> None:
    monkeypatch.chdir(tmp_path)
    for key in ("WANDB_SILENT", "WANDB_CONSOLE", "GDRQ_VERBOSE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning once per call, as a new process shows them;
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # but Python's default hides these
        gdrq(["fit", "--config", DIGITS_GDRQ, *TINY])
    out, err = capsys.readouterr()
    shown = [str(w.message) for w in caught] + [ln for ln in lines.lines if ln.startswith("WARNING")]
    shown += [ln for ln in (out + err).splitlines() if "warning" in ln.lower()]
    assert len(shown) <= 2, "\n".join(shown)
    gdrq_lines = [ln for ln in lines.lines if ln.startswith("INFO: [gdrq]")]
    assert gdrq_lines[0] == "INFO: [gdrq] run folder: runs/classification/digits_gdrq_w4a4"
    assert gdrq_lines[-1].startswith("INFO: [gdrq] val/acc1 at the end of each phase -> fp: ")
    assert "\x1b[" not in out + err  # no colour codes in a captured (non-terminal) output
    assert os.environ.get("WANDB_SILENT") is None  # the command's settings do not outlive it

    run = Path("runs/classification/digits_gdrq_w4a4")
    assert sorted(p.name for p in Path("runs").rglob("*") if p.parent == Path("runs")) == ["classification"]
    names = sorted(p.name for p in run.iterdir())
    assert names == ["best-epoch=0-step=2.ckpt", "config.yaml", "last.ckpt", "wandb"], names
    assert list((run / "wandb").glob("offline-run-*"))
    assert identical_files(run) == []
    fit_config = (run / "config.yaml").read_bytes()

    lines.lines.clear()
    gdrq(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "last.ckpt"), "--trainer.limit_test_batches", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"[gdrq] test output in {run}/test/ (config.yaml, wandb/)"
    gdrq(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "last.ckpt"),
          "--trainer.limit_predict_batches", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"[gdrq] predict output in {run}/predictions/ (classes.csv, config.yaml)"
    assert (run / "config.yaml").read_bytes() == fit_config  # the fit's config is never overwritten
    assert yaml.safe_load((run / "test" / "config.yaml").read_text())["ckpt_path"] == str(run / "last.ckpt")
    rows = (run / "predictions" / "classes.csv").read_text().splitlines()
    assert rows[0] == "index,file,class,name,probability" and len(rows) == 1 + 8  # one batch of 8 images
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(8)]


def test_verbose_keeps_lightnings_notices(tmp_path: Path, monkeypatch, capsys, lines) -> None:
    monkeypatch.chdir(tmp_path)
    gdrq(["fit", "--config", DIGITS_GDRQ, *TINY, "--trainer.logger", "false", "--trainer.max_epochs", "0", "--verbose"])
    assert any("GPU available:" in ln for ln in lines.lines)
    lines.lines.clear()
    gdrq(["fit", "--config", DIGITS_GDRQ, *TINY, "--trainer.logger", "false", "--trainer.max_epochs", "0"])
    assert not any("GPU available:" in ln for ln in lines.lines)


def test_a_resumed_fit_continues_in_its_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    quick = [*TINY, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    gdrq(["fit", "--config", DIGITS_GDRQ, *quick])
    run = Path("runs/classification/digits_gdrq_w4a4")
    first = (run / "config.yaml").read_bytes()
    gdrq(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "last.ckpt"), "--trainer.max_epochs", "2"])
    assert sorted(p.name for p in Path("runs/classification").iterdir()) == ["digits_gdrq_w4a4"]  # no _version_1
    assert (run / "config.yaml").read_bytes() == first
    assert yaml.safe_load((run / "config_resume.yaml").read_text())["ckpt_path"] == str(run / "last.ckpt")
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert identical_files(run) == []
