"""SegmentationModule end to end on tiny VOC and Cityscapes layouts, metrics and loss."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision

from gdrq_lightning import QuantConfig, quantize_model, quantized_layers
from tasks.segmentation import CityscapesDataModule, SegmentationModule, VOCSegmentationDataModule
from tasks.segmentation.metrics import iou_per_class, mean_iou, pixel_accuracy


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                      default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_fit_on_tiny_voc_logs_metrics_and_png(tiny_voc: Path, tmp_path: Path) -> None:
    dm = VOCSegmentationDataModule(root=str(tiny_voc), num_classes=11, batch_size=2, num_workers=0, crop_size=24)
    module = SegmentationModule(arch="fcn_resnet18", num_classes=11, lr=0.01, num_vis=2)
    before = module.model.classifier[0].weight.detach().clone()
    trainer = _trainer(tmp_path)
    trainer.fit(module, dm)
    m = trainer.callback_metrics
    assert {"train/loss", "train/loss_main", "train/loss_aux", "val/mIoU", "val/pixel_acc", "val/loss"} <= set(m)
    assert 0.0 <= float(m["val/mIoU"]) <= 1.0 and 0.0 <= float(m["val/pixel_acc"]) <= 1.0
    assert "val/iou_background" in m
    torch.testing.assert_close(m["train/loss"], m["train/loss_main"] + m["train/loss_aux"])
    assert not torch.equal(before, module.model.classifier[0].weight)  # it trained
    pngs = list((tmp_path / "predictions").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000


def test_fit_quantized_pspnet_on_tiny_cityscapes(tiny_cityscapes: Path, tmp_path: Path) -> None:
    dm = CityscapesDataModule(root=str(tiny_cityscapes), batch_size=2, num_workers=0, crop_size=16)
    module = SegmentationModule(arch="pspnet_resnet18", num_classes=19, lr=0.01, num_vis=0)
    quantize_model(module.model, QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=2,
                                             skip=module.quant_skip_default()))
    assert len(quantized_layers(module.model)) > 20
    trainer = _trainer(tmp_path)
    trainer.fit(module, dm)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and "val/iou_car" in m
    assert module.class_names[13] == "car" and "val/mIoU" in m


def test_aux_loss_weight_and_ignore(tmp_path: Path) -> None:
    module = SegmentationModule(arch="fcn_resnet18", num_classes=3, aux_weight=0.4)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.full((2, 4, 4), 255)
    assert module.criterion(logits, target).item() == 0.0  # all ignored: 0, not NaN
    target[0, 0, 0] = 1
    expected = torch.nn.functional.cross_entropy(logits[0:1, :, 0, 0], torch.tensor([1]))
    torch.testing.assert_close(module.criterion(logits, target), expected)
    module.train()
    x, y = torch.randn(2, 3, 24, 24), torch.randint(0, 3, (2, 24, 24))
    torch.manual_seed(1)  # same dropout masks in both forward passes
    out = module.model(x)
    torch.manual_seed(1)
    loss = module.training_step((x, y), 0)
    expected = module.criterion(out["out"], y) + 0.4 * module.criterion(out["aux"], y)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)  # BN in train mode is deterministic here


def test_metrics_from_confusion_matrix() -> None:
    cm = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    torch.testing.assert_close(iou_per_class(cm)[:2], torch.tensor([0.75, 2 / 3]))
    assert torch.isnan(iou_per_class(cm)[2])
    torch.testing.assert_close(mean_iou(cm), torch.tensor((0.75 + 2 / 3) / 2))
    torch.testing.assert_close(pixel_accuracy(cm), torch.tensor(5 / 6))
    module = SegmentationModule(arch="fcn_resnet18", num_classes=3)
    preds = torch.tensor([[0, 0, 1, 2]])
    target = torch.tensor([[0, 255, 1, 1]])
    module.val_confmat.update(preds, target)
    torch.testing.assert_close(module.val_confmat.compute(), torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0]]))


def test_argument_errors(tiny_voc: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known: fcn_resnet18"):
        SegmentationModule(arch="unet", num_classes=3)
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationModule(num_classes=3, ignore_index=1)
    dm = VOCSegmentationDataModule(root=str(tiny_voc), num_classes=11, batch_size=2, num_workers=0, crop_size=24)
    with pytest.raises(ValueError, match=r"num_classes=21\) does not match the data: the datamodule has 11"):
        _trainer(tmp_path).fit(SegmentationModule(arch="fcn_resnet18", num_classes=21), dm)


def test_pretrained_weights_load_from_local_file(tmp_path: Path) -> None:
    src = SegmentationModule(arch="pspnet_resnet18", num_classes=3)
    torch.save(src.model.state_dict(), tmp_path / "model.pt")
    imagenet = torchvision.models.resnet18(weights=None)  # torchvision key names, fc included
    torch.save(imagenet.state_dict(), tmp_path / "backbone.pt")
    dst = SegmentationModule(arch="pspnet_resnet18", num_classes=3, pretrained=str(tmp_path / "model.pt"))
    dst.load_pretrained()
    torch.testing.assert_close(dst.model.classifier.cls.weight, src.model.classifier.cls.weight)
    bb = SegmentationModule(arch="pspnet_resnet18", num_classes=3, pretrained_backbone=str(tmp_path / "backbone.pt"))
    bb.load_pretrained()
    torch.testing.assert_close(bb.model.backbone.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    fcn = SegmentationModule(arch="fcn_resnet18", num_classes=3, pretrained_backbone=str(tmp_path / "backbone.pt"))
    fcn.load_pretrained()
    torch.testing.assert_close(fcn.model.backbone.conv1.weight, imagenet.conv1.weight)
    missing = SegmentationModule(arch="fcn_resnet18", num_classes=3, pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        missing.load_pretrained()
    with pytest.raises(ValueError, match=r"pretrained .*model\.pt does not match fcn_resnet18 with num_classes=3"):
        SegmentationModule(arch="fcn_resnet18", num_classes=3, pretrained=str(tmp_path / "model.pt")).load_pretrained()
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    wrong = SegmentationModule(arch="fcn_resnet18", num_classes=3, pretrained_backbone=str(tmp_path / "r34.pt"))
    with pytest.raises(ValueError, match=r"pretrained_backbone .*r34\.pt does not match torchvision's resnet18"):
        wrong.load_pretrained()
