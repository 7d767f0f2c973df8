"""``pretrained_backbone: imagenet`` / ``pretrained: imagenet`` (issue #19): published weights by
name, read from the torch hub / Hugging Face cache; offline and uncached, one line that says
where to put the file. The network is off for every task test (``tests/tasks/conftest.py``)."""
from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision

import gdrq_lightning as G
from gdrq_lightning.cli import main
from tasks.classification import ClassificationModule
from tasks.detection import DetectionModule
from tasks.hub import PretrainedUnavailable
from tasks.segmentation import SegmentationModule

TINY_DET = dict(arch="fasterrcnn_resnet18_fpn", num_classes=3, min_size=64, max_size=64,
                anchor_sizes=[8, 16, 32, 64, 128], fpn_channels=16, representation_size=16)


def _cache_file(name: str) -> Path:
    """Where torch hub keeps torchvision's DEFAULT weights of ``name`` (the test's empty hub dir)."""
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def test_offline_and_uncached_torchvision_weights_fail_in_one_line_naming_the_cache_path() -> None:
    module = DetectionModule(**TINY_DET, pretrained_backbone="imagenet")  # construction fetches nothing
    with pytest.raises(PretrainedUnavailable) as info:
        module.load_pretrained()
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "cannot download torchvision's resnet18 ImageNet weights" in message
    assert f"put that file at {_cache_file('resnet18')}" in message and "TORCH_HOME" in message


def test_offline_timm_weights_fail_in_one_line_naming_the_hub_cache(offline_dirs) -> None:
    with pytest.raises(PretrainedUnavailable) as info:
        ClassificationModule("timm/resnet18", num_classes=10, pretrained="imagenet").load_pretrained()
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "timm's pretrained weights of resnet18 (timm/resnet18" in message and str(offline_dirs["hf_hub"]) in message


def test_the_cli_reports_it_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from tasks.detection import make_digits_coco

    root = make_digits_coco(tmp_path / "coco", num_train=2, num_val=1, canvas=64)
    monkeypatch.chdir(tmp_path)
    args = ["gdrq", "fit", "--model", "tasks.detection.DetectionModule", "--data", "tasks.detection.COCODataModule",
            "--data.root", str(root), "--model.arch", "fasterrcnn_resnet18_fpn", "--model.num_classes", "11",
            "--model.pretrained_backbone", "imagenet", "--trainer.max_steps", "1", "--trainer.logger", "false"]
    with mock.patch.object(sys, "argv", args), pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and err[0].startswith("gdrq: error: PretrainedUnavailable: pretrained_backbone=imagenet")
    assert str(_cache_file("resnet18")) in err[0] and len(err) == 2  # the error, then the --debug hint


def test_cached_torchvision_weights_load_without_the_network() -> None:
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    path = _cache_file("resnet18")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    try:
        detector = DetectionModule(**TINY_DET, pretrained_backbone="imagenet")
        G.quantize_model(detector.model, G.QuantConfig(method="gdrq", groups=1, skip=detector.quant_skip_default()))
        detector.load_pretrained()  # into the quantized backbone, as in setup
        body = detector.model.backbone.body
        torch.testing.assert_close(body.layer2[1].conv2.weight, reference.layer2[1].conv2.weight, atol=0, rtol=0)
        seg = SegmentationModule(arch="fcn_resnet18", num_classes=3, pretrained_backbone="imagenet")
        seg.load_pretrained()
        torch.testing.assert_close(seg.model.backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight,
                                   atol=0, rtol=0)
        with pytest.warns(UserWarning, match=r"skipped 2 tensors .*fc\.bias"):  # a 1000-class head for 7 classes
            clf = ClassificationModule("resnet18", num_classes=7, pretrained="imagenet")
            clf.load_pretrained()
        torch.testing.assert_close(clf.model.conv1.weight, reference.conv1.weight, atol=0, rtol=0)
    finally:
        path.unlink()


def test_timm_backbone_weights_map_onto_the_feature_extractor(monkeypatch) -> None:
    """timm's weights come for the plain model (``stem.0.*``, ``head.*``); the FPN body is the
    feature extractor (``stem_0.*``, no head)."""
    import timm

    torch.manual_seed(4)
    plain = timm.create_model("convnext_atto")
    monkeypatch.setattr("tasks.hub.timm_state_dict", lambda name, what: plain.state_dict())
    module = DetectionModule(**{**TINY_DET, "arch": "fasterrcnn_timm/convnext_atto_fpn"}, pretrained_backbone="imagenet")
    module.load_pretrained()
    body = module.model.backbone.body
    torch.testing.assert_close(body.stem_0.weight, plain.stem[0].weight, atol=0, rtol=0)
    torch.testing.assert_close(body.stages_3.blocks[1].mlp.fc2.weight, plain.stages[3].blocks[1].mlp.fc2.weight,
                               atol=0, rtol=0)
    seg = SegmentationModule(arch="pspnet_timm/convnext_atto", num_classes=3, pretrained_backbone="imagenet")
    seg.load_pretrained()
    torch.testing.assert_close(seg.model.backbone.body.stem_0.weight, plain.stem[0].weight, atol=0, rtol=0)


def test_unknown_names_are_errors() -> None:
    with pytest.raises(ValueError, match="torchvision has no pretrained weights for 'resnet7'"):
        from tasks.hub import torchvision_weights_file

        torchvision_weights_file("resnet7")
    with pytest.raises(ValueError, match="unknown timm model 'nope_net'"):
        from tasks.hub import timm_state_dict

        timm_state_dict("nope_net")
