"""Datasets on real layouts: label mapping, digits-VOC generator, transforms, file errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.segmentation import CityscapesDataModule, VOCSegmentationDataModule, make_digits_voc
from tasks.segmentation.datasets import cityscapes_dataset, voc_dataset
from tasks.segmentation.labels import CITYSCAPES_CLASSES, cityscapes_lut, labelid_to_trainid, voc_palette
from tasks.segmentation.transforms import RandomScaleCrop, pad_collate


def test_cityscapes_labelid_to_trainid_table() -> None:
    raw = np.array([7, 8, 11, 26, 33, 0, 1, 6, 9, 14, 29, 30, 24, 25, 23, 255])
    expected = np.array([0, 1, 2, 13, 18, 255, 255, 255, 255, 255, 255, 255, 11, 12, 10, 255])
    np.testing.assert_array_equal(labelid_to_trainid(raw), expected)
    lut = cityscapes_lut()
    train_ids = sorted(int(v) for v in lut if v != 255)
    assert train_ids == list(range(19))  # each train id exactly once
    assert len(CITYSCAPES_CLASSES) == 19 and CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[13] == "car"


def test_voc_palette_matches_voc() -> None:
    p = voc_palette()
    assert p[1].tolist() == [128, 0, 0] and p[15].tolist() == [192, 128, 128] and p[255].tolist() == [224, 224, 192]


def test_digits_voc_layout_and_determinism(tiny_voc: Path, tmp_path: Path) -> None:
    ids = (tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    assert len(ids) == 4 and len((tiny_voc / "ImageSets/Segmentation/val.txt").read_text().split()) == 2
    mask = Image.open(tiny_voc / "SegmentationClass" / f"{ids[0]}.png")
    assert mask.mode == "P" and mask.getpalette()[3:6] == [128, 0, 0]
    values = set(np.unique(np.asarray(mask)).tolist())
    assert 0 in values and 255 in values and values - {0, 255} and values <= set(range(11)) | {255}
    assert Image.open(tiny_voc / "JPEGImages" / f"{ids[0]}.jpg").size == (32, 32)
    again = make_digits_voc(tmp_path / "again", num_train=4, num_val=2, canvas=32, min_size=10, max_size=16, seed=0)
    for i in ids:
        a = np.asarray(Image.open(tiny_voc / "SegmentationClass" / f"{i}.png"))
        b = np.asarray(Image.open(again / "SegmentationClass" / f"{i}.png"))
        np.testing.assert_array_equal(a, b)
    other = make_digits_voc(tmp_path / "other", num_train=4, num_val=2, canvas=32, min_size=10, max_size=16, seed=1)
    assert any(not np.array_equal(np.asarray(Image.open(tiny_voc / "SegmentationClass" / f"{i}.png")),
                                  np.asarray(Image.open(other / "SegmentationClass" / f"{i}.png"))) for i in ids)


def test_voc_datamodule_batches(tiny_voc: Path) -> None:
    dm = VOCSegmentationDataModule(root=str(tiny_voc), num_classes=11, batch_size=2, num_workers=0, crop_size=24)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 24, 24) and y.shape == (2, 24, 24) and x.dtype == y.dtype == torch.uint8
    normalised, same = dm.on_after_batch_transfer((x, y), 0)  # what Lightning runs after the copy to the device
    assert normalised.dtype == torch.float32 and same is y
    torch.testing.assert_close(normalised, (x / 255 - torch.tensor(dm.mean).view(3, 1, 1)) / torch.tensor(dm.std).view(3, 1, 1))
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.uint8
    assert set(torch.unique(y).tolist()) <= set(range(11)) | {255}
    assert dm.class_names[0] == "background" and dm.class_names[10] == "digit9"


def test_cityscapes_dataset_maps_train_ids(tiny_cityscapes: Path) -> None:
    ds = cityscapes_dataset(tiny_cityscapes, "train")
    raw_path = ds.masks[0]
    raw = np.asarray(Image.open(raw_path))
    _, y = ds[0]
    np.testing.assert_array_equal(y.numpy(), cityscapes_lut()[raw])
    assert y[0, 0] == 13  # raw id 26 (car)
    dm = CityscapesDataModule(root=str(tiny_cityscapes), batch_size=2, num_workers=0, crop_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and int(y[y != 255].max()) < 19


def test_crop_pads_with_mean_colour_and_ignore() -> None:
    image = Image.fromarray(np.full((4, 5, 3), 7, dtype=np.uint8))
    cx, cy = RandomScaleCrop(8, (1.0, 1.0), hflip=False)(image, np.zeros((4, 5), dtype=np.uint8))
    assert cx.shape == (3, 8, 8) and cy.shape == (8, 8) and cx.dtype == cy.dtype == torch.uint8
    assert (cy == 255).sum() == 64 - 20 and (cy[:4, :5] == 0).all() and (cx[:, :4, :5] == 7).all()
    assert cx[:, 7, 7].tolist() == [124, 116, 104]  # ImageNet's mean colour: normalises to ~0
    x, y = torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.uint8)
    bx, by = pad_collate([(x, y), (torch.ones(3, 6, 2), torch.ones(6, 2, dtype=torch.uint8))])
    assert bx.shape == (2, 3, 6, 5) and by[0, 5, 0] == 255 and by[1, 0, 4] == 255 and by[1, 0, 1] == 1


def _copy_voc(src: Path, dst: Path) -> tuple[Path, str]:
    shutil.copytree(src, dst)
    first = (dst / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    return dst, first


def test_mask_with_wrong_size_names_file(tiny_voc: Path, tmp_path: Path) -> None:
    root, first = _copy_voc(tiny_voc, tmp_path / "voc")
    mask_path = root / "SegmentationClass" / f"{first}.png"
    Image.open(mask_path).resize((31, 32)).save(mask_path)
    ds = voc_dataset(root, "train", num_classes=11)
    with pytest.raises(ValueError, match=rf"{first}\.png.*31x32.*{first}\.jpg.*32x32"):
        ds[0]


def test_label_outside_class_range_names_file_and_value(tiny_voc: Path, tmp_path: Path) -> None:
    root, first = _copy_voc(tiny_voc, tmp_path / "voc")
    mask_path = root / "SegmentationClass" / f"{first}.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[0, 0] = 37
    out = Image.fromarray(mask, "P")
    out.putpalette(voc_palette().reshape(-1).tolist())
    out.save(mask_path)
    voc_dataset(root, "train", num_classes=40)[0]  # fine with 40 classes
    with pytest.raises(ValueError, match=rf"{first}\.png.*\[37\]"):
        voc_dataset(root, "train", num_classes=21)[0]


def test_rgb_mask_is_rejected(tiny_voc: Path, tmp_path: Path) -> None:
    root, first = _copy_voc(tiny_voc, tmp_path / "voc")
    mask_path = root / "SegmentationClass" / f"{first}.png"
    Image.open(mask_path).convert("RGB").save(mask_path)
    with pytest.raises(ValueError, match=rf"{first}\.png.*'RGB'"):
        voc_dataset(root, "train", num_classes=11)[0]


def test_missing_files_name_the_file(tiny_voc: Path, tmp_path: Path) -> None:
    root, first = _copy_voc(tiny_voc, tmp_path / "voc")
    (root / "SegmentationClass" / f"{first}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"SegmentationClass/{first}\.png"):
        voc_dataset(root, "train", num_classes=11)
    (root / "JPEGImages" / f"{first}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"JPEGImages/{first}\.jpg"):
        voc_dataset(root, "train", num_classes=11)
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation/train_aug\.txt"):
        VOCSegmentationDataModule(root=str(root), num_classes=11, augmented=True).setup("fit")


def test_cityscapes_errors(tiny_cityscapes: Path, tmp_path: Path) -> None:
    root = tmp_path / "cs"
    shutil.copytree(tiny_cityscapes, root)
    ds = cityscapes_dataset(root, "val")
    bad = np.asarray(Image.open(ds.masks[1])).copy()
    bad[0, 0] = 40
    Image.fromarray(bad, "L").save(ds.masks[1])
    with pytest.raises(ValueError, match=rf"{ds.masks[1].name}.*\[40\]"):
        ds[1]
    ds.masks[0].unlink()
    with pytest.raises(FileNotFoundError, match=ds.masks[0].name):
        cityscapes_dataset(root, "val")
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        cityscapes_dataset(root, "test")
