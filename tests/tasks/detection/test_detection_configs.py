"""The shipped detection configs build the classes they name (no training)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.detection import COCODataModule, DetectionModule

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs" / "detection").glob("*.yaml"))


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {
        "digits_coco_fp32.yaml", "digits_coco_gdrq_w4a4.yaml", "digits_coco_gdrq_w4a4_scratch.yaml",
        "coco2017_r50fpn_gdrq_w4a4.yaml", "digits_coco_gdrq_w4a4_auto.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    assert "logger" not in cfg["trainer"]  # the CLI supplies W&B (offline)
    if cfg["model"]["init_args"].get("pretrained"):  # fine-tuning reads what the FP32 recipe writes
        # the FP32 run's folder (gdrq_lightning.run_folder: runs/<task>/<config name>/) holds its last.ckpt
        assert cfg["model"]["init_args"]["pretrained"] == "runs/detection/digits_coco_fp32/last.ckpt"
    assert cfg["model"]["class_path"] == "tasks.detection.DetectionModule"
    assert cfg["data"]["class_path"] == "tasks.detection.COCODataModule"
    model_args = dict(cfg["model"]["init_args"])
    model_args["pretrained_backbone"] = None  # placeholders in the COCO recipe
    model_args["pretrained"] = None  # the fine-tuning recipe's FP32 checkpoint
    module = DetectionModule(**model_args)
    COCODataModule(**cfg["data"]["init_args"])
    callbacks = cfg["trainer"].get("callbacks") or []
    if "gdrq" in path.stem:
        assert [c["class_path"] for c in callbacks] == ["gdrq_lightning.GDRQCallback"]
        callback = pytest.importorskip("gdrq_lightning.callback")
        from gdrq_lightning import QuantConfig, Schedule

        args = callbacks[0]["init_args"]
        cb = callback.GDRQCallback(QuantConfig(**args["config"]), Schedule(**args["schedule"]))
        assert cb.config.weight_bits == 4 and cb.config.act_bits == 4
        # every quantized conv's output channels divide into the configured groups
        import gdrq_lightning as G

        cfg_q = QuantConfig(**{**args["config"], "skip": module.quant_skip_default()})
        G.quantize_model(module.model, cfg_q)
        assert G.quantized_layers(module.model)
    else:
        assert not callbacks
