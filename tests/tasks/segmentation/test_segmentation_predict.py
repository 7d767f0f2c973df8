"""``gdrq test`` / ``gdrq predict`` for segmentation: test and predict loaders, and palette PNG
masks at each image's own size in ``<run dir>/predictions/masks/``."""
from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from gdrq_lightning.cli import main
from tasks.segmentation import CityscapesDataModule, SegmentationModule, VOCSegmentationDataModule
from tasks.segmentation.labels import voc_palette

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "segmentation" / "digits_voc_fcn_gdrq_w4a4_scratch.yaml"


def gdrq(*args: str) -> None:
    with mock.patch.object(sys, "argv", ["gdrq", *args]):
        main()


def ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def test_fit_test_and_predict_through_the_cli(tiny_voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = [
        "--config", str(CONFIG), "--data.root", str(tiny_voc), "--data.batch_size", "2", "--data.crop_size", "24",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    ]
    gdrq("fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1")
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    gdrq("test", *common, "--ckpt_path", ckpt)
    out = capsys.readouterr().out
    assert "test/mIoU" in out and "test/pixel_acc" in out
    gdrq("predict", *common, "--ckpt_path", ckpt)
    masks = tmp_path / "predictions" / "masks"
    assert sorted(p.stem for p in masks.iterdir()) == sorted(ids(tiny_voc, "val"))
    for path in masks.iterdir():
        mask = Image.open(path)
        assert mask.mode == "P" and mask.size == Image.open(tiny_voc / "JPEGImages" / f"{path.stem}.jpg").size
        assert np.asarray(mask).max() < 11
        assert mask.getpalette()[:30] == voc_palette()[:10].reshape(-1).tolist()


def _voc_of_sizes(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """A VOC layout whose val images have the given (width, height)s."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"img{i}" for i in range(len(sizes))]
    for name, (w, h) in zip(names, sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8), "L").save(root / "SegmentationClass" / f"{name}.png")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_predict_crops_each_mask_back_to_its_image(tmp_path: Path) -> None:
    root = _voc_of_sizes(tmp_path / "voc", [(30, 20), (18, 26), (24, 24)])
    dm = VOCSegmentationDataModule(root=str(root), num_classes=3, val_batch_size=3, num_workers=0)
    module = SegmentationModule(arch="fcn_resnet18", num_classes=3)
    trainer = pl.Trainer(logger=False, default_root_dir=str(tmp_path / "run"), enable_progress_bar=False,
                         enable_model_summary=False)
    (batch,) = trainer.predict(module, dm)
    assert batch["ids"] == ["img0", "img1", "img2"]
    assert [tuple(m.shape) for m in batch["masks"]] == [(20, 30), (26, 18), (24, 24)]
    for name, mask in zip(batch["ids"], batch["masks"]):
        png = Image.open(tmp_path / "run" / "predictions" / "masks" / f"{name}.png")
        assert png.mode == "P" and png.size == (mask.shape[1], mask.shape[0])
        assert np.array_equal(np.asarray(png), mask.numpy())


def test_test_and_predict_splits_default_to_the_val_split(tiny_voc: Path, tiny_cityscapes: Path) -> None:
    dm = VOCSegmentationDataModule(root=str(tiny_voc), num_classes=11, num_workers=0)
    dm.setup("test")
    dm.setup("predict")
    assert [p.stem for p in dm.test_set.images] == ids(tiny_voc, "val") == dm.predict_set.ids
    assert dm.train_set is None and dm.val_set is None
    other = VOCSegmentationDataModule(root=str(tiny_voc), num_classes=11, test_split="train", predict_split="trainval",
                                      num_workers=0)
    other.setup("test")
    other.setup("predict")
    assert [p.stem for p in other.test_set.images] == ids(tiny_voc, "train")
    assert other.predict_set.ids == ids(tiny_voc, "trainval")
    x, y = next(iter(other.test_dataloader()))
    assert x.shape[1:] == (3, 32, 32) and y.shape[1:] == (32, 32)
    city = CityscapesDataModule(root=str(tiny_cityscapes), num_workers=0)
    city.setup("predict")
    images, names, sizes = next(iter(city.predict_dataloader()))
    assert names == ["frankfurt_000000_000019", "frankfurt_000001_000019"] and sizes == [(24, 40), (24, 40)]
    assert images.shape == (2, 3, 24, 40) and images.dtype == torch.float32
