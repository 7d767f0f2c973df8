"""``gdrq export`` on task checkpoints: the task's ``export_network()`` is what gets exported
(the whole detector, a segmentation model's main map), ``--data-config`` calibrates on real
images and compares PyTorch and ONNX Runtime, and what cannot be exported fails in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
from gdrq_lightning.checkpoint import load_quantized_module
from gdrq_lightning.cli import main
from gdrq_lightning.export import export_model, run_onnxruntime
from gdrq_lightning.export.accuracy import calibration_inputs, datamodule_from_config, match_detections
from gdrq_lightning.export.build import build_qdq_model
from gdrq_lightning.export.fold import fold_groups_into_bn
from tasks.detection import DetectionModule, make_digits_coco
from tasks.segmentation import SegmentationModule, make_digits_voc


def quantized(module: pl.LightningModule, shape: tuple[int, ...] | None) -> GDRQCallback:
    """The callback's swap, then one train-mode batch to initialise the activation statistics
    (``shape`` an image batch; ``None``: a detector's images and targets); eval mode after."""
    gdrq = GDRQCallback(QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=2), Schedule())
    gdrq.setup(pl.Trainer(logger=False), module, "validate")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if shape is not None:
            module.model.train()(torch.randn(shape, generator=gen))
        else:
            boxes = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
            module.model.train()(list(torch.rand(2, 3, 64, 64, generator=gen)), [boxes, boxes])
    module.eval()
    return gdrq


def quantized_checkpoint(module: pl.LightningModule, path: Path, shape: tuple[int, ...] | None) -> Path:
    """What a gdrq run saves (weights, hyper-parameters, callback state), without training."""
    gdrq = quantized(module, shape)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "callbacks": {"GDRQCallback": gdrq.state_dict()}}
    torch.save(ckpt, path)
    return path


def gdrq(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()  # what the test printed before (e.g. torch's one-time notices while it trained): not the command's
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
    # ORT's default session runs the export form exactly (the random-weight network's class scores all but
    # tie, so the export's roundings reorder many pixels against the fake-quant model: agreement is not tested)
    outputs = report["outputs"]
    assert outputs["onnxruntime_vs_onnx_form"]["output"] <= 1e-4 * outputs["output_abs_max"]
    assert 0.0 <= acc["prediction_agreement"] <= 1.0 and "pixel_acc on 3 images" in out  # the printed summary
    assert report["integer_layers"] == 20  # the 19 backbone convs and the FCN head's 3x3


def test_a_fixed_size_network_refuses_data_of_another_size_in_one_line(voc_config, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    psp = SegmentationModule(arch="pspnet_resnet18", num_classes=11, aux_loss=False)
    ckpt = quantized_checkpoint(psp, tmp_path / "psp.ckpt", (2, 3, 48, 48))
    code, _, err = gdrq(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--input-shape", "3", "48", "48",
                         "--data-config", str(voc_config)], capsys)
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("gdrq: error")] == [(
        f"gdrq: error: ValueError: the ONNX model {tmp_path / 'e' / 'model.onnx'} takes input ['batch', 3, 48, 48] "
        "but the data gives [2, 3, 32, 32]; export with --input-shape 3 32 32"
    )]


@pytest.fixture(scope="module")
def coco_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_digits_coco(tmp_path_factory.mktemp("coco"), num_train=2, num_val=4, canvas=64, seed=0)
    config = {"data": {"class_path": "tasks.detection.COCODataModule",
                       "init_args": {"root": str(root), "batch_size": 2, "num_workers": 0}}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_detection_exports_the_whole_detector_with_an_integer_backbone_fpn_and_heads(coco_config, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    module = DetectionModule(arch="fasterrcnn_resnet18_fpn", num_classes=11, min_size=64, max_size=64,
                             anchor_sizes=[8, 16, 32, 64, 128], fpn_channels=16, representation_size=16,
                             box_score_thresh=0.0)
    ckpt = quantized_checkpoint(module, tmp_path / "det.ckpt", None)
    code, out, err = gdrq(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--input-shape", "3", "64", "64",
                           "--data-config", str(coco_config), "--calibration-batches", "2"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "model_report.json").read_text())
    # backbone (16 block convs + 3 downsample) + FPN (4 lateral + 4 output convs, whose inputs are quantized)
    # + heads (the RPN head conv and fc6, whose inputs are quantized, and fc7)
    assert report["integer_layers"] == 30 and report["float_layers"] == {}
    # in ORT: the RPN head conv once per FPN level (5), fc6/fc7 as QGemm; float: the stem conv, the RPN's
    # cls_logits / bbox_pred per level and the box predictor's two linears
    assert report["onnx"]["kernels"] == {"integer": 34, "float": 13}
    assert report["dynamic"]["size"] and not report["dynamic"]["batch"]
    assert report["val_accuracy"]["metric"] == "detection_match" and report["val_accuracy"]["samples"] == 4
    # on images the test builds: ORT's default session gives the export form's detections (the random-weight
    # detector's scores nearly tie, ~0.13, so against the fake-quant model the order is a coin toss: the real
    # detector is compared in the README); another image size runs too (resized inside the graph, where
    # ORT's and torch's bilinear resize round apart and move a few quantized levels)
    network = load_quantized_module(str(ckpt)).export_network().eval()
    images = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calibration = calibration_inputs(datamodule_from_config(str(coco_config)), 2)  # what the CLI calibrated on
    form = build_qdq_model(fold_groups_into_bn(network), images[0], calibration=calibration)
    found = 0
    for x in images:
        with torch.no_grad():
            expected = form(x)
        # the graph as written computes the export form ...
        assert match_detections(expected, run_onnxruntime(report["files"]["onnx"], x, optimize=False), score=0.0, top=5) == (5, 5)
        # ... and ORT's fused kernels (QLinearAdd rounds in its own float arithmetic) all but always do
        found += match_detections(expected, run_onnxruntime(report["files"]["onnx"], x), score=0.0, top=5)[0]
    assert found >= 13  # of 15 (measured: 14 or 15; a wrong scale or bias lattice leaves next to none)
    boxes, labels, scores = run_onnxruntime(report["files"]["onnx"], torch.rand(1, 3, 72, 56))
    assert boxes.shape == (len(labels), 4) == (len(scores), 4) and float(boxes[:, 2].max()) <= 56


def test_segmentation_exports_with_a_dynamic_size_except_pspnet(tmp_path) -> None:
    torch.manual_seed(0)
    fcn = SegmentationModule(arch="fcn_resnet18", num_classes=3, aux_loss=False)
    psp = SegmentationModule(arch="pspnet_resnet18", num_classes=3, aux_loss=False)
    for module in (fcn, psp):
        quantized_checkpoint(module, tmp_path / "m.ckpt", (2, 3, 48, 48))
    report = export_model(fcn.export_network(), torch.zeros(1, 3, 48, 48), tmp_path / "fcn")
    assert report["dynamic"]["size"] and report["check_input_shape"] == [2, 3, 56, 56]
    assert report["integer_layers"] == 20 and report["onnx"]["kernels"]["integer"] == 20  # all but stem and classifier
    report = export_model(psp.export_network(), torch.zeros(1, 3, 48, 48), tmp_path / "psp")
    assert not report["dynamic"]["size"] and "pyramid pooling" in report["dynamic"]["fixed_size_reason"]
    assert report["check_input_shape"] == [2, 3, 48, 48]
    # the pyramid convs and the bottleneck read quantized inputs (quant_inputs_default): integer too
    assert report["integer_layers"] == 19 + 4 + 1 and report["float_layers"] == {}


def test_export_model_names_what_a_model_returns_instead_of_one_tensor(tmp_path) -> None:
    class Maps(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": x, "aux": x}

    with pytest.raises(TypeError, match=r"tuple of tensors; this one returns a dict with keys \['aux', 'out'\].*export_network"):
        export_model(Maps(), torch.zeros(1, 3, 8, 8), tmp_path / "maps")
