"""COCO loading, validation, transforms and the digits-COCO generator."""
from __future__ import annotations

import json

import pytest
import torch

from tasks.detection import (
    COCOAnnotationWarning, COCODataModule, COCODatasetError, COCODetection, detection_collate, make_digits_coco,
)
from tasks.detection.dataset import RandomHorizontalFlip

CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 42, "name": "emu"}]


def ann(ann_id: int, image_id: int, cat: int, bbox: list[float], **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0, **extra}


def img(image_id: int, w: int = 40, h: int = 30) -> dict:
    return {"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h}


def test_non_contiguous_categories_map_to_contiguous_labels(write_coco) -> None:
    path = write_coco([img(1), img(2)], [ann(1, 1, 42, [1, 2, 10, 5]), ann(2, 1, 3, [0, 0, 4, 4])], CATS)
    ds = COCODetection(path.parent / "img", path)
    assert ds.cat_id_to_label == {3: 1, 7: 2, 42: 3}
    assert ds.label_to_cat_id == {1: 3, 2: 7, 3: 42}
    assert ds.class_names == ["cat", "dog", "emu"]
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8  # scaled to 0..1 on the device
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 4.0, 4.0]]))
    assert target["labels"].tolist() == [3, 1]
    assert int(target["image_id"]) == 1


def test_image_without_boxes_is_kept_with_empty_target(write_coco) -> None:
    path = write_coco([img(1), img(2)], [ann(1, 1, 7, [1, 1, 5, 5])], CATS)
    ds = COCODetection(path.parent / "img", path)
    assert len(ds) == 2
    _, target = ds[1]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert len(COCODetection(path.parent / "img", path, drop_empty=True)) == 1


def test_truncated_json_names_the_file(write_coco) -> None:
    path = write_coco([img(1)], [ann(1, 1, 7, [1, 1, 5, 5])], CATS)
    path.write_text(path.read_text()[:-25])
    with pytest.raises(COCODatasetError, match="instances.json.*not valid json"):
        COCODetection(path.parent / "img", path)


def test_missing_json_and_missing_keys(write_coco, tmp_path) -> None:
    with pytest.raises(COCODatasetError, match="not found: .*nope.json"):
        COCODetection(tmp_path, tmp_path / "nope.json")
    path = write_coco([img(1)], [], CATS)
    data = json.loads(path.read_text())
    del data["images"][0]["width"]
    path.write_text(json.dumps(data))
    with pytest.raises(COCODatasetError, match=r"images\[0\]"):
        COCODetection(path.parent / "img", path)


def test_missing_image_file_names_the_file_when_read(write_coco) -> None:
    path = write_coco([img(1), img(2)], [ann(1, 1, 7, [1, 1, 5, 5])], CATS)
    (path.parent / "img" / "2.png").unlink()
    ds = COCODetection(path.parent / "img", path)  # no stat per image up front (118k of them for COCO 2017)
    ds[0]
    with pytest.raises(COCODatasetError, match=r"image file not found: .*2\.png \(image id 2\)"):
        ds[1]
    with pytest.raises(COCODatasetError, match=r"not found: .*2\.png"):  # the up-front check, on request
        COCODetection(path.parent / "img", path, check_files=True)


def test_unknown_category_id_is_an_error(write_coco) -> None:
    path = write_coco([img(1)], [ann(5, 1, 8, [1, 1, 5, 5])], CATS)
    with pytest.raises(COCODatasetError, match="annotation id 5 .*unknown category id 8"):
        COCODetection(path.parent / "img", path)


def test_bad_boxes_warn_with_image_id_and_are_skipped(write_coco) -> None:
    anns = [
        ann(1, 1, 7, [5, 5, -3, 4]),  # negative width
        ann(2, 1, 7, [5, 5, 4, 0]),  # zero height
        ann(3, 1, 3, [50, 50, 5, 5]),  # entirely outside the 40x30 image
        ann(4, 1, 42, [-2, 20, 10, 20]),  # partly outside: clipped
        ann(5, 2, 3, [1, 1, float("nan"), 2]),  # non-finite
    ]
    path = write_coco([img(1), img(2)], anns, CATS)
    with pytest.warns(COCOAnnotationWarning) as record:
        ds = COCODetection(path.parent / "img", path)
    messages = [str(w.message) for w in record]
    assert any("image id 1, annotation id 1" in m and "degenerate" in m for m in messages)
    assert any("annotation id 2" in m for m in messages)
    assert any("annotation id 3" in m and "outside" in m for m in messages)
    assert any("image id 2, annotation id 5" in m for m in messages)
    assert ds.skipped_boxes == 4
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 20.0, 8.0, 30.0]]))
    assert target["labels"].tolist() == [3]


def test_crowd_boxes_dropped_from_training_only(write_coco) -> None:
    path = write_coco([img(1)], [ann(1, 1, 7, [1, 1, 5, 5]), ann(2, 1, 3, [2, 2, 9, 9], iscrowd=1)], CATS)
    assert len(COCODetection(path.parent / "img", path, drop_crowd=True)[0][1]["boxes"]) == 1
    assert len(COCODetection(path.parent / "img", path, drop_crowd=False)[0][1]["boxes"]) == 2


def test_hflip_moves_boxes_with_the_image() -> None:
    image = torch.zeros(3, 10, 20)
    image[:, 2:5, 1:4] = 1.0
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "labels": torch.tensor([1])}
    out_img, out_tgt = RandomHorizontalFlip(1.0)(image, target)
    torch.testing.assert_close(out_tgt["boxes"], torch.tensor([[16.0, 2.0, 19.0, 5.0]]), atol=0, rtol=0)
    assert out_img[:, 2:5, 16:19].eq(1).all() and out_img.sum() == image.sum()
    assert target["boxes"][0, 0] == 1.0  # input untouched
    same_img, same_tgt = RandomHorizontalFlip(0.0)(image, target)
    assert same_img is image and same_tgt is target


def test_collate_returns_tuples(tiny_coco) -> None:
    dm = COCODataModule(root=str(tiny_coco), batch_size=3)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, tuple) and isinstance(targets, tuple) and len(images) == len(targets) == 3
    assert detection_collate([(1, "a"), (2, "b")]) == ((1, 2), ("a", "b"))
    assert dm.num_classes == 11
    assert dm.cat_id_to_label[19] == 10 and dm.label_to_cat_id[1] == 1


def test_digits_coco_is_deterministic_and_non_contiguous(tmp_path) -> None:
    a = make_digits_coco(tmp_path / "a", num_train=5, num_val=3, canvas=64, seed=3)
    b = make_digits_coco(tmp_path / "b", num_train=5, num_val=3, canvas=64, seed=3)
    c = make_digits_coco(tmp_path / "c", num_train=5, num_val=3, canvas=64, seed=4)
    for split in ("train", "val"):
        ja = (a / "annotations" / f"instances_{split}.json").read_bytes()
        assert ja == (b / "annotations" / f"instances_{split}.json").read_bytes()
        assert (a / split / "000001.png").read_bytes() == (b / split / "000001.png").read_bytes()
    assert (a / "train" / "000001.png").read_bytes() != (c / "train" / "000001.png").read_bytes()
    data = json.loads((a / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1 + 2 * d for d in range(10)]
    assert [c["name"] for c in data["categories"]] == [str(d) for d in range(10)]
    for a_ in data["annotations"]:
        x, y, w, h = a_["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64


def test_datamodule_generates_digits_and_checks_split_categories(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="make_digits_if_missing=True needs root"):
        COCODataModule(make_digits_if_missing=True)
    calls = []

    def small(root):
        calls.append(root)
        return make_digits_coco(root, num_train=3, num_val=2, canvas=32)

    monkeypatch.setattr("tasks.detection.datamodule.make_digits_coco", small)
    dm = COCODataModule(root=str(tmp_path / "gen"), make_digits_if_missing=True, batch_size=2)
    dm.prepare_data()
    dm.prepare_data()  # already there: not regenerated
    assert calls == [tmp_path / "gen"]
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    # the two splits must define the same categories
    val_json = tmp_path / "gen" / "annotations" / "instances_val.json"
    val = json.loads(val_json.read_text())
    val["categories"] = val["categories"][:-1]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != 19]
    val_json.write_text(json.dumps(val))
    with pytest.raises(COCODatasetError, match="category ids differ"):
        COCODataModule(root=str(tmp_path / "gen")).setup("fit")
