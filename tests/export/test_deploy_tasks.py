"""The deploy form on the task networks (FCN, PSPNet, the whole Faster R-CNN) and through
``gdrq export``: a checkpoint saved in deploy form exports its trained grids, and ``--validate``
scores the written file in ONNX Runtime's default session on the run's own validation split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from gdrq_lightning import GDRQCallback
from gdrq_lightning.checkpoint import CheckpointError, load_quantized_module
from gdrq_lightning.cli import main
from gdrq_lightning.export import is_deployed, run_onnxruntime, simulate_deploy, to_onnx
from gdrq_lightning.export.accuracy import match_detections
from tasks.classification import ClassificationModule
from tasks.detection import DetectionModule
from tasks.segmentation import SegmentationModule
from test_export_tasks import quantized

pytest.importorskip("onnxruntime")


def save(module: pl.LightningModule, gdrq: GDRQCallback, path: Path, done: list[str], data: dict | None = None) -> Path:
    state = gdrq.state_dict() | {"done": done}
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "callbacks": {"GDRQCallback": state}}
    if data is not None:  # what `gdrq fit` saves: the datamodule's class path and arguments
        ckpt["datamodule_hyper_parameters"] = data
    torch.save(ckpt, path)
    return path


def gdrq(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize("arch", ["fcn_resnet18", "pspnet_resnet18"])
def test_segmentation_networks_in_deploy_form_run_as_their_export(arch, tmp_path) -> None:
    torch.manual_seed(0)
    module = SegmentationModule(arch=arch, num_classes=11, aux_loss=False)
    quantized(module, (2, 3, 48, 48))
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    simulate_deploy(module.model, [x])  # the quant network itself: its output is a dict of maps
    network = module.export_network()
    path = to_onnx(network, x[:1], tmp_path / "s.onnx")
    with torch.no_grad():
        expected = network(x)
    got = run_onnxruntime(path, x)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.999  # measured: 1.0 (FCN and PSPNet)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5  # measured 1.4e-7, 2.1e-7


def test_classification_checkpoint_in_deploy_form_exports_its_grids_and_validates_on_its_own_data(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    module = ClassificationModule(model="resnet18", num_classes=10)
    gdrq_cb = quantized(module, (4, 3, 32, 32))
    simulate_deploy(module.model, [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    data = {"_class_path": "tasks.classification.DigitsDataModule", "image_size": 32, "batch_size": 128}
    ckpt = save(module, gdrq_cb, tmp_path / "c.ckpt", ["quant_weights", "quant_acts", "deploy"], data)
    loaded = load_quantized_module(str(ckpt))
    assert is_deployed(loaded.model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), module.model(x))  # the grids as saved: nothing calibrated again
    code, out, err = gdrq(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--validate"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "model_report.json").read_text())
    assert report["deploy"] and report["onnx"]["kernels"] == {"integer": 19, "float": 2}
    v = report["validation"]
    assert v["samples"] == 359  # the digits validation split
    assert v["pytorch"]["top1"] == v["onnxruntime"]["top1"] and v["agreement"]["top1_agreement"] == 1.0
    assert v["agreement"]["median_rel_logit_error"] <= 1e-6 and v["agreement"]["max_rel_logit_error"] <= 1e-5
    assert "top1_agreement" in out and "ONNX Runtime" in out and len(out.splitlines()) <= 40  # the short summary
    # a checkpoint that says 'deploy' but holds no deploy state is refused in one line
    torch.manual_seed(0)
    plain = ClassificationModule(model="resnet18", num_classes=10)
    bad = save(plain, quantized(plain, (4, 3, 32, 32)), tmp_path / "bad.ckpt", ["deploy"], data)
    with pytest.raises(CheckpointError, match="lists the phase 'deploy' but its weights hold no deploy state"):
        load_quantized_module(str(bad))


@pytest.fixture(scope="module")
def voc_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml

    from tasks.segmentation import make_digits_voc

    root = make_digits_voc(tmp_path_factory.mktemp("voc"), num_train=2, num_val=3, canvas=32, min_size=10, max_size=16)
    config = {"data": {"class_path": "tasks.segmentation.VOCSegmentationDataModule",
                       "init_args": {"root": str(root), "num_classes": 11, "batch_size": 2, "num_workers": 0}}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "config.yaml"


def test_segmentation_validate_reports_miou_and_pixel_agreement(voc_config, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    module = SegmentationModule(arch="fcn_resnet18", num_classes=11, aux_loss=False)
    ckpt = save(module, quantized(module, (2, 3, 32, 32)), tmp_path / "s.ckpt", ["quant_acts"])
    code, out, err = gdrq(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--input-shape", "3", "32", "32",
                           "--data-config", str(voc_config), "--validate"], capsys)
    assert code == 0, err
    v = json.loads((tmp_path / "e" / "model_report.json").read_text())["validation"]
    assert v["samples"] == 3 and set(v["pytorch"]) == set(v["onnxruntime"]) == {"mIoU", "pixel_acc"}
    assert 0.0 <= v["onnxruntime"]["mIoU"] <= 1.0 and set(v["agreement"]) == {"pixel_agreement", "pixel_agreement_all"}
    assert 0.0 < v["agreement"]["pixel_agreement"] <= 1.0


def test_detector_in_deploy_form_validates_with_coco_map_and_box_agreement(tmp_path, capsys) -> None:
    import yaml

    from tasks.detection import make_digits_coco

    root = make_digits_coco(tmp_path / "coco", num_train=2, num_val=3, canvas=64, seed=0)
    config = {"data": {"class_path": "tasks.detection.COCODataModule", "init_args": {"root": str(root), "batch_size": 2, "num_workers": 0}}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    module = DetectionModule(arch="fasterrcnn_resnet18_fpn", num_classes=11, min_size=64, max_size=64,
                             anchor_sizes=[8, 16, 32, 64, 128], fpn_channels=16, representation_size=16, box_score_thresh=0.0)
    gdrq_cb = quantized(module, None)
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    simulate_deploy(module.model, [(images,)])  # the detector in eval mode takes a list of images
    network = module.export_network().eval()
    path = to_onnx(network, images[0][None], tmp_path / "d.onnx")
    with torch.no_grad():
        expected = network(images[1][None])
    assert match_detections(expected, run_onnxruntime(path, images[1][None]), score=0.0, top=100) == (100, 100)
    ckpt = save(module, gdrq_cb, tmp_path / "d.ckpt", ["quant_acts", "deploy"])
    code, out, err = gdrq(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--input-shape", "3", "64", "64",
                           "--data-config", str(root / "config.yaml"), "--validate"], capsys)
    assert code == 0, err
    v = json.loads((tmp_path / "e" / "model_report.json").read_text())["validation"]
    assert v["samples"] == 3 and {"mAP", "AP50"} <= set(v["pytorch"]) and set(v["pytorch"]) == set(v["onnxruntime"])
    assert v["pytorch"]["mAP"] == pytest.approx(v["onnxruntime"]["mAP"], abs=1e-3)
    assert v["agreement"]["boxes"] == 300 and v["agreement"]["box_agreement"] >= 0.98  # measured: 1.0
