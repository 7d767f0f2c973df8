"""The shipped segmentation configs build what they name; one runs through ``gdrq fit``."""
from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

import gdrq_lightning as G
from gdrq_lightning import QuantConfig, Schedule
from tasks.segmentation import CityscapesDataModule, SegmentationModule, VOCSegmentationDataModule

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "segmentation"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
DATA = {"tasks.segmentation.VOCSegmentationDataModule": VOCSegmentationDataModule,
        "tasks.segmentation.CityscapesDataModule": CityscapesDataModule}


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {
        "digits_voc_fcn_fp32.yaml", "digits_voc_fcn_gdrq_w4a4.yaml", "digits_voc_pspnet_fp32.yaml",
        "digits_voc_pspnet_gdrq_w4a4.yaml", "voc_fcn_resnet50_gdrq_w4a4.yaml", "voc_pspnet_resnet50_gdrq_w4a4.yaml",
        "cityscapes_pspnet_resnet50_gdrq_w4a4.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    assert "logger" not in cfg["trainer"]  # the CLI supplies W&B (offline)
    assert cfg["model"]["class_path"] == "tasks.segmentation.SegmentationModule"
    # the fine-tuning configs start from a checkpoint another config writes (checked below)
    module = SegmentationModule(**{k: v for k, v in cfg["model"]["init_args"].items() if k != "pretrained"})
    dm = DATA[cfg["data"]["class_path"]](**cfg["data"]["init_args"])
    assert dm.num_classes == module.num_classes
    callbacks = cfg["trainer"].get("callbacks") or []
    if "gdrq" not in path.stem:
        assert not callbacks
        return
    assert [c["class_path"] for c in callbacks] == ["gdrq_lightning.GDRQCallback"]
    args = callbacks[0]["init_args"]
    G.GDRQCallback(QuantConfig(**args["config"]), Schedule(**args["schedule"]))
    assert args["config"]["weight_bits"] == 4 and args["config"]["act_bits"] == 4
    # the groups divide every quantized layer's output channels
    G.quantize_model(module.model, QuantConfig(**{**args["config"], "skip": module.quant_skip_default()}))
    assert G.quantized_layers(module.model)


def test_digits_quickstart_pairs_match() -> None:
    """The from-scratch GDRQ configs differ from FP32 only in the callback (same epochs, data,
    optimizer); the quickstart GDRQ configs fine-tune the checkpoint the FP32 config writes."""
    for arch in ("fcn", "pspnet"):
        fp = yaml.safe_load((CONFIG_DIR / f"digits_voc_{arch}_fp32.yaml").read_text())
        scratch = yaml.safe_load((CONFIG_DIR / f"digits_voc_{arch}_gdrq_w4a4_scratch.yaml").read_text())
        scratch["trainer"].pop("callbacks")
        assert scratch == fp
        tuned = yaml.safe_load((CONFIG_DIR / f"digits_voc_{arch}_gdrq_w4a4.yaml").read_text())
        # the FP32 run's folder (gdrq_lightning.run_folder: runs/<task>/<config name>/) holds its last.ckpt
        assert tuned["model"]["init_args"]["pretrained"] == f"runs/segmentation/digits_voc_{arch}_fp32/last.ckpt"
        assert tuned["data"] == fp["data"] and tuned["model"]["init_args"]["arch"] == fp["model"]["init_args"]["arch"]


def test_gdrq_fit_through_the_cli(tiny_voc: Path, tmp_path: Path) -> None:
    from gdrq_lightning.cli import main

    args = [
        "gdrq", "fit", "--config", str(CONFIG_DIR / "digits_voc_pspnet_gdrq_w4a4_scratch.yaml"),
        "--data.root", str(tiny_voc), "--data.batch_size", "2", "--data.crop_size", "24",
        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        "--trainer.callbacks.init_args.schedule", '{"scale_clip": 0, "quant_weights": 0, "quant_acts": 1, '
        '"groups": 1, "freeze_bn": null}',
    ]
    with mock.patch.object(sys, "argv", args):
        main()
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert "model.backbone.layer1.0.conv1.weight_quantizer.quant_on" in state
    assert bool(state["model.backbone.layer1.0.relu.act_quantizer.quant_on"])
    assert "model.backbone.conv1.weight_quantizer.quant_on" not in state  # kept full precision
    assert list((tmp_path / "predictions").glob("val_epoch*.png"))
