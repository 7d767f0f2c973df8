"""The ``gdrq`` command: help, config errors, the default W&B-offline logger, the default
``QuantMonitor``, ``gdrq data`` through entry points, and one real ``gdrq fit`` on digits
through the console script.

Parser behaviour is tested in process (``main(args)``): a subprocess costs seconds of
imports each. The end-to-end run goes through the installed console script."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from gdrq_lightning.checkpoint import load_quantized_module
from gdrq_lightning.cli import data_commands, main

REPO = Path(__file__).resolve().parents[2]
DIGITS_GDRQ = str(REPO / "configs" / "classification" / "digits_gdrq_w4a4.yaml")
TINY_RUN = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--data.image_size", "16", "--data.batch_size", "8", "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


def gdrq(args: list[str], cwd: Path, quiet_env: bool = True) -> subprocess.CompletedProcess:
    """Run the installed console script (or the module, where the script is not on PATH);
    ``quiet_env=False`` leaves W&B and Python warnings as a user's shell has them."""
    exe = shutil.which("gdrq")
    cmd = [exe] if exe else [sys.executable, "-m", "gdrq_lightning.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "GDRQ_", "PYTHONWARNINGS"))}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))  # this checkout's code
    if quiet_env:
        env.update(WANDB_SILENT="true", WANDB_DIR=str(cwd), PYTHONWARNINGS="ignore")
    return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_main(args: list[str]) -> int:
    """``gdrq ARGS`` in this process, as the console script calls it; returns the exit code."""
    with mock.patch.object(sys, "argv", ["gdrq", *args]), pytest.raises(SystemExit) as info:
        main()
    return info.value.code


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# -- in process: parser behaviour ------------------------------------------------------------
def test_fit_help_mentions_config(capsys: pytest.CaptureFixture) -> None:
    assert run_main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config CONFIG" in out and "--trainer.max_epochs" in out and "--checkpoint.save_last" in out
    assert "--quant_monitor.log_every_n_steps" in out and "--quant_monitor.plot_layer" in out


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"trainer": {"bogus": 1}}, "trainer.bogus"),
        ({"model": {"init_args": {"nonexistent_key": 1}}}, "nonexistent_key"),
    ],
)
def test_unknown_config_key_fails_naming_the_key(tmp_path: Path, monkeypatch, capsys, extra: dict, named: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_main(["fit", "--config", DIGITS_GDRQ, "--config", write_yaml(tmp_path / "extra.yaml", extra)]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("mode", "offline"), [(None, True), ("offline", True), ("online", False)])
def test_default_logger_is_wandb_in_the_run_folder(tmp_path: Path, monkeypatch, capsys, mode: str | None, offline: bool) -> None:
    monkeypatch.chdir(tmp_path)
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    assert run_main(["fit", "--config", DIGITS_GDRQ, "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    logger = config["trainer"]["logger"]
    logger = logger[0] if isinstance(logger, list) else logger
    assert logger["class_path"].endswith("loggers.WandbLogger")
    assert logger["init_args"]["save_dir"] is None and logger["init_args"]["offline"] is offline  # None: the run folder
    assert config["trainer"]["default_root_dir"] is None and config["checkpoint"]["save_last"] is True
    assert config["checkpoint"]["filename"] == "best-{epoch}-{step}" and config["checkpoint"]["save_top_k"] == 1
    callback = config["trainer"]["callbacks"][0]["init_args"]
    assert callback["config"]["groups"] == 4 and callback["schedule"]["scale_clip"] == 1


def test_data_help(capsys: pytest.CaptureFixture) -> None:
    assert run_main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert "make-digits-coco" in out and "make-digits-voc" in out and "out_dir" in out


def test_data_commands_are_entry_points(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Declared in pyproject.toml (group ``gdrq.data``); the library names no task module."""
    commands = data_commands()
    assert {name: ep.value for name, ep in commands.items()} == {
        "make-digits-coco": "tasks.detection.digits_coco:make_digits_coco",
        "make-digits-voc": "tasks.segmentation.digits_voc:make_digits_voc",
        "make-digits-folder": "tasks.classification.digits_folder:make_digits_folder",
    }
    main(["data", "make-digits-voc", str(tmp_path / "voc"), "--seed", "1"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "voc")
    assert len((tmp_path / "voc" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()) == 100


def test_unknown_data_command_lists_the_known_ones(capsys: pytest.CaptureFixture) -> None:
    assert run_main(["data", "make-imagenet", "out"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'make-imagenet'" in err and "'make-digits-coco', 'make-digits-folder', 'make-digits-voc'" in err


@pytest.mark.parametrize("quantized", [True, False], ids=["gdrq", "fp32-without-callback"])
def test_quant_monitor_is_present_by_default(tmp_path: Path, monkeypatch, quantized: bool) -> None:
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(Path(DIGITS_GDRQ).read_text())
    config["trainer"]["callbacks"][0]["init_args"]["schedule"] = {
        "scale_clip": 0, "quant_weights": "step:1", "quant_acts": None, "groups": None}
    if not quantized:
        config["trainer"]["callbacks"] = []
    config["trainer"]["logger"] = {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "logs"}}
    i = TINY_RUN.index("--trainer.logger")
    args = TINY_RUN[:i] + TINY_RUN[i + 2:]
    main(["fit", "--config", write_yaml(tmp_path / "c.yaml", config), *args, "--trainer.log_every_n_steps", "1"])
    (metrics,) = (tmp_path / "logs").glob("**/metrics.csv")  # an explicit logger writes where it was told
    run = tmp_path / "runs" / "classification" / "c"  # the run folder: c.yaml in the working directory
    with open(metrics) as f:
        columns = set(next(csv.reader(f)))
    plots = sorted(p.name for p in (run / "quant_plots").glob("*.png")) if quantized else []
    if quantized:
        assert {"quant/layer1.0.conv1/w_threshold", "quant/layer1.0.relu/a_clipped_frac"} <= columns
        assert plots == ["quant_weights_layer1_0_conv1.png", "scale_clip_layer1_0_conv1.png"]
    else:
        assert "train/loss" in columns and not any(c.startswith("quant/") for c in columns)
        assert not (run / "quant_plots").exists()


# -- the console script ------------------------------------------------------------------------
def test_gdrq_fit_digits_end_to_end(tmp_path: Path) -> None:
    i = TINY_RUN.index("--trainer.logger")
    with_wandb_and_bar = TINY_RUN[:i] + TINY_RUN[i + 4:]  # the default W&B logger (offline) and progress bar
    proc = gdrq(["fit", "--config", DIGITS_GDRQ, *with_wandb_and_bar], tmp_path, quiet_env=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout is a pipe, not a terminal: one readable line per epoch instead of a redrawn bar
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("[epoch ")]
    assert len(epoch_lines) == 1 and epoch_lines[0].startswith("[epoch 1/1] 2 steps, "), proc.stdout[-2000:]
    assert "| val/acc1 " in epoch_lines[0] and "\r" not in proc.stdout
    # quiet: no W&B lines (nor its colour codes), at most 2 warnings (this tiny run: log_every_n_steps > its 2 steps)
    both = proc.stdout + proc.stderr
    assert "wandb:" not in both and "\x1b[" not in both, both[-3000:]
    assert len([ln for ln in both.splitlines() if "warn" in ln.lower()]) <= 2, both[-3000:]
    assert "[gdrq] quantized 36 layers (gdrq W4A4)" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("[gdrq] val/acc1 at the end of each phase -> fp: ")  # the last line
    run = tmp_path / "runs" / "classification" / "digits_gdrq_w4a4"
    assert "[gdrq] run folder: runs/classification/digits_gdrq_w4a4" in proc.stderr
    last = run / "last.ckpt"
    assert last.is_file() and (run / "config.yaml").is_file() and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["classification"]
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    state = ckpt["callbacks"]["GDRQCallback"]
    assert state["done"] == [] and state["config"]["groups"] == 4  # schedule begins at epoch 2
    assert state["module"] == "tasks.classification.module.ClassificationModule"
    module = load_quantized_module(str(last))
    conv = module.model.layer1[0].conv1.weight_quantizer
    assert (conv.quant_groups, conv.is_on("clip_on"), conv.is_on("quant_on")) == (4, False, False)
    assert module(torch.zeros(1, 3, 16, 16)).shape == (1, 10)


def test_invalid_quant_config_value_is_one_short_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {"callbacks": [{"class_path": "gdrq_lightning.GDRQCallback",
                                   "init_args": {"config": {"method": "gdrq", "weight_bits": 9}}}]},
        "model": {"class_path": "tasks.classification.ClassificationModule"},
        "data": {"class_path": "tasks.classification.DigitsDataModule", "init_args": {"image_size": 16}},
    }
    assert run_main(["fit", "--config", write_yaml(tmp_path / "bad.yaml", config), "--trainer.logger", "false"]) == 2
    err = capsys.readouterr().err
    # jsonargparse wraps the QuantConfig error in ~20 lines of Union attempts; gdrq reports the original
    assert err.splitlines() == [
        "gdrq: error: ValueError: QuantConfig.weight_bits=9 is out of range (allowed: integer 1..8)",
        "(set GDRQ_DEBUG=1 or pass --debug for the traceback)",
    ]


# -- discoverability (issue #19) ---------------------------------------------------------------
def test_top_level_help_lists_all_six_subcommands(capsys: pytest.CaptureFixture) -> None:
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("commands:\n")[1].splitlines() if line.startswith("  ")]
    assert listed == ["fit", "validate", "test", "predict", "export", "data", "bits"]
    assert "gdrq export --ckpt CKPT --out DIR" in out and "GDRQ_DEBUG=1" in out
    assert run_main([]) == 2 and "commands:" in capsys.readouterr().out


def test_unknown_command_lists_them_all(capsys: pytest.CaptureFixture) -> None:
    assert run_main(["fitt", "--config", "x.yaml"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gdrq: error: unknown command 'fitt'; one of: fit, validate, test, predict, export, data, bits (gdrq --help)")


def test_a_loader_worker_error_is_reported_in_one_line() -> None:
    """DataLoader re-raises a worker's error with the worker's whole traceback in the message."""
    from torch._utils import ExceptionWrapper

    from gdrq_lightning.cli import one_line

    try:
        raise FileNotFoundError("image file not found: /data/x/1.png")
    except FileNotFoundError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(FileNotFoundError) as info:
        wrapped.reraise()
    assert len(str(info.value).splitlines()) > 3
    assert one_line(str(info.value)) == "image file not found: /data/x/1.png"
    assert one_line("plain message") == "plain message"


def test_a_segmentation_fit_records_its_datamodule_for_export_validate(tmp_path: Path) -> None:
    """`gdrq export --validate` rebuilds the run's datamodule from the checkpoint alone."""
    from gdrq_lightning.checkpoint import load_datamodule

    config = str(REPO / "configs" / "segmentation" / "digits_voc_fcn_fp32.yaml")
    tiny = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    proc = gdrq(["fit", "--config", config, *tiny], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = load_datamodule(str(tmp_path / "runs" / "segmentation" / "digits_voc_fcn_fp32" / "last.ckpt"))
    assert type(data).__name__ == "VOCSegmentationDataModule"
    assert (str(data.root), data.num_classes, data.make_digits_if_missing) == ("data/digits_voc", 11, True)
