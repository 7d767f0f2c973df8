"""VOCdevkit / SBD / Cityscapes trees from ``root`` alone, labels checked against ``num_classes``
before the first step, timm backbones (issue #19)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image
from torch import nn

import gdrq_lightning as G
from tasks.segmentation import CityscapesDataModule, SegmentationModule, VOCSegmentationDataModule


def _fit(tmp_path: Path, module: pl.LightningModule, dm: pl.LightningDataModule, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)
    trainer.fit(module, dm)
    return trainer


@pytest.fixture
def vocdevkit(tiny_voc: Path, tmp_path: Path) -> Path:
    """``<tmp>/data/VOCdevkit/VOC2012/...`` as VOC's archive unpacks."""
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    shutil.copytree(tiny_voc, voc)
    return tmp_path / "data"


@pytest.mark.parametrize("level", ["data", "VOCdevkit", "VOC2012"])
def test_voc_root_at_any_level_trains_one_step(vocdevkit: Path, tmp_path: Path, level: str) -> None:
    root = {"data": vocdevkit, "VOCdevkit": vocdevkit / "VOCdevkit", "VOC2012": vocdevkit / "VOCdevkit" / "VOC2012"}
    dm = VOCSegmentationDataModule(root=str(root[level]), num_classes=11, batch_size=2, num_workers=0, crop_size=24)
    trainer = _fit(tmp_path, SegmentationModule(arch="fcn_resnet18", num_classes=11, num_vis=0), dm)
    assert trainer.global_step == 1 and "val/mIoU" in trainer.callback_metrics


def test_missing_voc_names_the_folders_looked_at(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no PASCAL VOC layout under .*nowhere: looked for JPEGImages/ and "
                                                r"ImageSets/Segmentation/ in .*nowhere, .*nowhere/VOC2012, "
                                                r".*nowhere/VOCdevkit/VOC2012"):
        VOCSegmentationDataModule(root=str(tmp_path / "nowhere"), num_classes=11).setup("fit")


def test_sbd_augmented_list_and_masks(vocdevkit: Path, tmp_path: Path) -> None:
    """DeepLab's SBD release: ``SegmentationClassAug/`` (grayscale masks) and a train_aug list of path pairs."""
    voc = vocdevkit / "VOCdevkit" / "VOC2012"
    aug = voc / "SegmentationClassAug"
    aug.mkdir()
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for i in ids:
        mask = np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png")).copy()
        mask[mask == 255] = 0  # SBD has no boundary band
        Image.fromarray(mask, "L").save(aug / f"{i}.png")
    (voc / "ImageSets" / "SegmentationAug").mkdir()
    (voc / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    dm = VOCSegmentationDataModule(root=str(vocdevkit), num_classes=11, augmented=True, batch_size=2, num_workers=0,
                                   crop_size=24)
    dm.setup("fit")
    assert dm.train_set.masks[0] == aug / f"{ids[0]}.png" and len(dm.train_set) == len(ids)
    assert dm.val_set.masks[0].parent.name == "SegmentationClass"  # validation keeps VOC's own masks
    _fit(tmp_path, SegmentationModule(arch="fcn_resnet18", num_classes=11, num_vis=0), dm)


def test_cityscapes_root_trains_and_predicts_the_unlabelled_test_split(tiny_cityscapes: Path, tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"  # root may also be the folder that holds cityscapes/
    shutil.copytree(tiny_cityscapes, root)
    test_dir = root / "leftImg8bit" / "test" / "berlin"
    test_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(test_dir / "berlin_000000_000019_leftImg8bit.png")
    dm = CityscapesDataModule(root=str(tmp_path), batch_size=2, num_workers=0, crop_size=16, predict_split="test")
    module = SegmentationModule(arch="fcn_resnet18", num_classes=19, num_vis=0)
    trainer = _fit(tmp_path / "run", module, dm)
    assert trainer.global_step == 1
    trainer.predict(module, dm)  # no gtFine/test needed
    assert (tmp_path / "run" / "predictions" / "masks" / "berlin_000000_000019.png").is_file()
    with pytest.raises(FileNotFoundError, match=r"looked for .*empty/leftImg8bit, .*empty/cityscapes/leftImg8bit"):
        CityscapesDataModule(root=str(tmp_path / "empty")).setup("fit")


def test_labels_beyond_num_classes_fail_at_setup(tiny_voc: Path, tmp_path: Path) -> None:
    """digits-VOC masks hold labels 0..10: with num_classes=5 the run stops in setup, naming a file."""
    dm = VOCSegmentationDataModule(root=str(tiny_voc), num_classes=5, batch_size=2, num_workers=0, crop_size=24)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"mask '.*\.png' has labels \[.*\] outside the valid range \(num_classes=5"):
        trainer.fit(SegmentationModule(arch="fcn_resnet18", num_classes=5), dm)
    assert trainer.global_step == 0


@pytest.mark.parametrize(("arch", "groups"), [("fcn_timm/resnet18", 4), ("pspnet_timm/efficientnet_b0", 2)])
def test_timm_backbones_quantize_and_train(arch: str, groups: int, tiny_voc: Path, tmp_path: Path) -> None:
    module = SegmentationModule(arch=arch, num_classes=11, num_vis=0)
    skip = module.quant_skip_default()
    stem = "backbone.body.conv1" if "resnet" in arch else "backbone.body.conv_stem"
    assert skip[0] == stem and isinstance(module.model.get_submodule(stem), nn.Conv2d)
    cb = G.GDRQCallback(G.QuantConfig(method="gdrq", groups=groups, k_a=4.0), G.Schedule())
    dm = VOCSegmentationDataModule(root=str(tiny_voc), num_classes=11, batch_size=2, num_workers=0, crop_size=32)
    _fit(tmp_path, module, dm, callbacks=[cb])
    names = [n for n, _ in G.quantized_layers(module.model)]
    assert any(n.startswith("backbone.body.") for n in names) and stem not in names
    with pytest.raises(ValueError, match=r"fcn_timm/<name>, pspnet_timm/<name>"):
        SegmentationModule(arch="fcn_timm/", num_classes=3)
