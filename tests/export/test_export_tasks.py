"""``gdrq export`` on task checkpoints: the task's ``export_network()`` is what gets exported,
``--data-config`` compares PyTorch and ONNX Runtime for segmentation too, and what cannot
be exported fails in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
from gdrq_lightning.cli import main
from gdrq_lightning.export import export_model
from tasks.detection import DetectionModule
from tasks.segmentation import SegmentationModule, make_digits_voc


def quantized_checkpoint(module: pl.LightningModule, path: Path, shape: tuple[int, ...] | None) -> Path:
    """What a gdrq run saves (weights, hyper-parameters, callback state), without training:
    the callback's swap, then one train-mode batch to initialise the activation statistics."""
    gdrq = GDRQCallback(QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=2), Schedule())
    gdrq.setup(pl.Trainer(logger=False), module, "validate")
    if shape is not None:
        with torch.no_grad():
            module.model.train()(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "callbacks": {"GDRQCallback": gdrq.state_dict()}}
    torch.save(ckpt, path)
    return path


def gdrq(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def voc_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_digits_voc(tmp_path_factory.mktemp("voc"), num_train=2, num_val=3, canvas=32, min_size=10, max_size=16)
    config = {"data": {"class_path": "tasks.segmentation.VOCSegmentationDataModule",
                       "init_args": {"root": str(root), "num_classes": 11, "batch_size": 2, "num_workers": 0}}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    module = SegmentationModule(arch="fcn_resnet18", num_classes=11, aux_loss=False)
    return quantized_checkpoint(module, tmp_path_factory.mktemp("seg") / "seg.ckpt", (2, 3, 32, 32))


def test_segmentation_export_with_data_config_reports_pixel_accuracy(seg_ckpt, voc_config, tmp_path, capsys) -> None:
    code, out, err = gdrq(["export", "--ckpt", str(seg_ckpt), "--out", str(tmp_path / "e"), "--input-shape", "3", "32", "32",
                           "--data-config", str(voc_config)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "model_report.json").read_text())
    acc = report["val_accuracy"]
    assert acc["metric"] == "pixel_acc" and acc["samples"] == 3
    assert 0 < acc["counted"] < 3 * 32 * 32  # the 255 band around each digit is not counted
    assert 0.0 <= acc["pixel_acc_pytorch"] <= 1.0 and 0.0 <= acc["pixel_acc_onnxruntime"] <= 1.0
    assert acc["prediction_agreement"] >= 0.99  # same maps up to level flips at rounding ties
    assert json.loads(out)["val_accuracy"] == acc


def test_an_input_shape_that_does_not_match_the_data_fails_in_one_line(seg_ckpt, voc_config, tmp_path, capsys) -> None:
    code, _, err = gdrq(["export", "--ckpt", str(seg_ckpt), "--out", str(tmp_path / "e"), "--input-shape", "3", "48", "48",
                         "--data-config", str(voc_config)], capsys)
    assert code == 2
    assert err.splitlines()[0] == (
        f"gdrq: error: ValueError: the ONNX model {tmp_path / 'e' / 'model.onnx'} takes input ['batch', 3, 48, 48] "
        "but the data gives [2, 3, 32, 32]; export with --input-shape 3 32 32"
    )


def test_detection_export_is_refused_in_one_line(tmp_path, capsys) -> None:
    module = DetectionModule(arch="fasterrcnn_resnet18_fpn", num_classes=3, min_size=32, max_size=32,
                             anchor_sizes=[8, 16, 32, 64, 128], fpn_channels=16, representation_size=16)
    ckpt = quantized_checkpoint(module, tmp_path / "det.ckpt", None)
    code, _, err = gdrq(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e")], capsys)
    assert code == 2
    assert err.splitlines()[0].startswith("gdrq: error: TypeError: detection export is not supported yet")


def test_export_model_names_what_a_model_returns_instead_of_one_tensor(tmp_path) -> None:
    class Maps(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": x, "aux": x}

    with pytest.raises(TypeError, match=r"one tensor; this one returns a dict with keys \['aux', 'out'\].*export_network"):
        export_model(Maps(), torch.zeros(1, 3, 8, 8), tmp_path / "maps")
